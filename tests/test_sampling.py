"""`igdit sample`: labels, per-sample noise, rank-independent results, the .npz layout, bad input."""
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch

from igdit.cli import main as igdit
from igdit.commands.sample import merge_parts
from igdit.config import ConfigError
from igdit.generation import Sampling, class_labels, generate
from igdit.guidance import InternalGuidance

from helpers import tiny_module

REPO = Path(__file__).resolve().parents[1]


def main(argv):
    return igdit(["sample", *argv])


def _module(exits=(2,), seed=0):
    torch.manual_seed(seed)
    module = tiny_module(backbone={"exits": list(exits)}, terms=None)
    with torch.no_grad():
        for p in module.backbone.parameters():  # leave zero-init behind so outputs depend on everything
            p.add_(0.05 * torch.randn_like(p))
    return module.eval()


def _save(module, path, meta=True):
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "pytorch-lightning_version": lightning.__version__}
    if meta:  # what a trained checkpoint carries: the shards' meta.json (identity encoder for digits)
        checkpoint["igdit_data_meta"] = {"encoder": {"name": "identity"},
                                         "normalizer": {"shift": [0.0], "scale": [1.0]}}
    torch.save(checkpoint, path)
    return str(path)


def test_balanced_labels_give_exactly_equal_class_counts():
    labels = class_labels(1000, 10, "balanced", seed=3)
    assert torch.bincount(labels, minlength=10).tolist() == [100] * 10
    assert not torch.equal(labels, labels.sort().values)  # shuffled
    random = class_labels(1000, 10, "random", seed=3)
    assert random.min() >= 0 and random.max() < 10 and len(set(torch.bincount(random).tolist())) > 1
    with pytest.raises(ConfigError, match="--num"):
        class_labels(1001, 10, "balanced", seed=0)


@pytest.mark.parametrize("sampler", ["euler", "sde"])
def test_samples_do_not_depend_on_batch_size_or_rank_count(sampler):
    module = _module()
    rules, sampling = [InternalGuidance(2.0)], Sampling(sampler, 4)
    labels = class_labels(6, 10, "random", seed=0)
    one, _, _ = generate(module, rules, sampling, list(range(6)), labels, seed=5, batch_size=6, progress=False)
    small, _, _ = generate(module, rules, sampling, list(range(6)), labels, seed=5, batch_size=4, progress=False)
    even, _, _ = generate(module, rules, sampling, [0, 2, 4], labels[[0, 2, 4]], seed=5, batch_size=2, progress=False)
    odd, _, _ = generate(module, rules, sampling, [1, 3, 5], labels[[1, 3, 5]], seed=5, batch_size=3, progress=False)
    np.testing.assert_array_equal(one, small)
    np.testing.assert_array_equal(one[0::2], even)
    np.testing.assert_array_equal(one[1::2], odd)
    assert one.shape == (6, 8, 8, 3) and one.dtype == np.uint8
    other_seed, _, _ = generate(module, rules, sampling, list(range(6)), labels, seed=6, batch_size=6, progress=False)
    assert not np.array_equal(one, other_seed)


def test_merge_parts_puts_samples_in_index_order(tmp_path):
    images = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    for rank, idx in enumerate([[0, 2, 4], [1, 3]]):
        np.savez(tmp_path / f"part-{rank:05d}-of-00002.npz", arr_0=images[idx], indices=np.asarray(idx))
    np.testing.assert_array_equal(merge_parts(tmp_path, 2, 5), images)
    assert not list(tmp_path.glob("part-*"))


def test_sample_command_writes_adm_npz_and_refuses_to_overwrite(tmp_path, capsys):
    ckpt = _save(_module(), tmp_path / "m.ckpt")
    out = tmp_path / "out"
    args = ["--ckpt", ckpt, "--sampler", "heun", "--steps", "3", "--num", "12", "--batch_size", "5",
            "--ig.scale", "1.5", "--ig.interval", "[0.3,1]", "--cfg.scale", "2", "--cfg.interval", "[0,0.7]",
            "--labels", "balanced", "--out", str(out)]
    assert main(args[:-2] + ["--num", "20", "--out", str(out)]) == 0
    data = np.load(out / "samples.npz")
    assert data["arr_0"].shape == (20, 8, 8, 3) and data["arr_0"].dtype == np.uint8
    assert np.bincount(data["labels"], minlength=10).tolist() == [2] * 10
    printed = capsys.readouterr().out
    assert "NFE 5 per sample" in printed  # Heun: 2 * 3 - 1
    assert (out / "samples.png").is_file() and not list(out.glob("part-*"))
    assert main(args) == 2  # 12 is not a multiple of 10 classes, and the folder is taken anyway
    assert capsys.readouterr().err.startswith("error: ")
    assert main(args[:-2] + ["--num", "20", "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(args[:-2] + ["--num", "20", "--out", str(out), "--overwrite"]) == 0


@pytest.mark.parametrize("extra,field", [
    (["--ig.interval", "[0.8,0.2]"], "guidance.ig.interval"),
    (["--cfg.scale", "-2"], "cfg.scale"),
    (["--ig.scale", "-1"], "ig.scale"),
    (["--sampler", "ddim"], "sampler"),
    (["--ag.scale", "2"], "guidance.ag.ckpt"),
    (["--preset", "sit-xl2-ig-cfg"], "--preset"),
    (["--preset", "nope"], "preset"),
    (["--schedule", "karras"], "schedule"),
])
def test_bad_sampling_input_is_one_line_before_sampling(extra, field, tmp_path, capsys):
    ckpt = _save(_module(), tmp_path / "m.ckpt")
    assert main(["--ckpt", ckpt, "--out", str(tmp_path / "o"), "--num", "4", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and field in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_checkpoint_without_data_meta_is_refused_before_sampling(tmp_path, capsys):
    ckpt = _save(_module(), tmp_path / "m.ckpt", meta=False)
    assert main(["--ckpt", ckpt, "--out", str(tmp_path / "o")]) == 2
    assert "cannot be decoded" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_ig_on_a_checkpoint_without_exit_names_the_available_exits(tmp_path, capsys):
    ckpt = _save(_module(exits=()), tmp_path / "m.ckpt")
    assert main(["--ckpt", ckpt, "--out", str(tmp_path / "o"), "--ig.scale", "1.5"]) == 2
    assert "exits []" in capsys.readouterr().err


def test_an_experiment_that_disagrees_with_the_checkpoint_is_refused(tmp_path, capsys):
    ckpt = _save(_module(exits=(3,)), tmp_path / "m.ckpt")
    args = ["--ckpt", ckpt, "--out", str(tmp_path / "o"), "--num", "10", "--steps", "2", "--sampler", "euler"]
    assert main(args + ["--experiment", str(REPO / "experiments/default.yaml")]) == 2  # default.yaml: exits [2]
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --experiment model.backbone.exits: [2]") and "[3]" in err
    assert not (tmp_path / "o").exists()
    matching = tmp_path / "exp.yaml"
    matching.write_text((REPO / "experiments/default.yaml").read_text().replace("exits: [2]", "exits: [3]"))
    assert main(args + ["--experiment", str(matching)]) == 0


def test_options_can_come_from_a_config_file_and_print_config_round_trips(tmp_path, capsys):
    ckpt = _save(_module(), tmp_path / "m.ckpt")
    options = tmp_path / "sample.yaml"
    options.write_text(f"ckpt: {ckpt}\nsampler: euler\nsteps: 2\nnum: 10\nout: {tmp_path / 'o'}\n"
                       "ig: {scale: 1.5, interval: [0.2, 1.0]}\n")
    with pytest.raises(SystemExit):
        main(["--config", str(options), "--print_config"])
    printed = capsys.readouterr().out
    again = tmp_path / "again.yaml"
    again.write_text(printed)
    assert main(["--config", str(again)]) == 0
    import yaml

    assert yaml.safe_load(printed)["ig"] == {"scale": 1.5, "interval": [0.2, 1.0], "exit": None}


def test_a_preset_fills_the_published_setting_and_flags_override_it():
    from igdit.commands.sample import parse

    args = parse(["--ckpt", "x", "--preset", "lightningdit-xl1-ig-cfg", "--steps", "10"])
    assert (args.sampler, args.steps, args.schedule, args.shift, args.heun_last_step) == ("heun", 10, "shifted", 0.3,
                                                                                          "heun")
    assert (args.ig.scale, args.cfg.scale, list(args.cfg.interval)) == (1.4, 1.45, [0.0, 0.81])


# The hyper-parameters a checkpoint written by igdit before the parts were injected (commit 3e13311) carries.
OLD_HPARAMS = {
    "name": "SiT-T/2", "exits": [2], "input_size": 8, "in_channels": 1, "num_classes": 10, "qk_norm": False,
    "class_dropout": 0.1, "transport": {"path": "linear", "time_sampling": "uniform", "lognormal_mean": 0.0,
                                        "lognormal_std": 1.0},
    "diffusion_loss": {"weight": 1.0, "start_step": 0, "stop_step": None, "t_range": [0.0, 1.0], "loss": "mse",
                       "beta": 0.05},
    "exit_loss": {"weight": 0.5, "start_step": 0, "stop_step": None, "t_range": [0.0, 1.0], "loss": "mse",
                  "beta": 0.05},
    "optimizer": {"lr": 0.0001, "betas": [0.9, 0.999], "weight_decay": 0.0, "eps": 1e-08, "warmup_steps": 0},
    "compile": False}


def test_a_checkpoint_written_before_the_reshape_still_samples(tmp_path, capsys):
    module = _module()
    old = tmp_path / "old.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": OLD_HPARAMS,
                "pytorch-lightning_version": lightning.__version__,
                "igdit_data_meta": {"encoder": {"name": "identity"}, "normalizer": {"shift": [0.0], "scale": [1.0]}}},
               old)
    new = tmp_path / "new.ckpt"
    _save(module, new)
    outs = []
    for ckpt in (old, new):
        out = tmp_path / ckpt.stem
        assert main(["--ckpt", str(ckpt), "--sampler", "euler", "--steps", "3", "--num", "10", "--ig.scale", "2",
                     "--out", str(out)]) == 0
        outs.append(np.load(out / "samples.npz")["arr_0"])
    np.testing.assert_array_equal(*outs)
