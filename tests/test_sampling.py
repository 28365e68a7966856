"""`igdit sample`: labels, per-sample noise, rank-independent results, the .npz layout, bad input."""
import lightning
import numpy as np
import pytest
import torch

from igdit.config import ConfigError
from igdit.guidance import Denoiser, GuidanceRule
from igdit.module import IGDiTModule
from igdit.sampling import class_labels, generate, main, merge_parts

TINY = dict(name="SiT-T/2", input_size=8, in_channels=1, num_classes=10)


def _module(exits=(2,), seed=0):
    torch.manual_seed(seed)
    module = IGDiTModule(**TINY, exits=list(exits), exit_loss={"weight": 0.5 if exits else 0.0})
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
    den = Denoiser(module.backbone, ig=GuidanceRule(2.0))
    labels = class_labels(6, 10, "random", seed=0)
    one, _ = generate(module, den, sampler, 4, list(range(6)), labels, seed=5, batch_size=6, progress=False)
    small, _ = generate(module, den, sampler, 4, list(range(6)), labels, seed=5, batch_size=4, progress=False)
    even, _ = generate(module, den, sampler, 4, [0, 2, 4], labels[[0, 2, 4]], seed=5, batch_size=2, progress=False)
    odd, _ = generate(module, den, sampler, 4, [1, 3, 5], labels[[1, 3, 5]], seed=5, batch_size=3, progress=False)
    np.testing.assert_array_equal(one, small)
    np.testing.assert_array_equal(one[0::2], even)
    np.testing.assert_array_equal(one[1::2], odd)
    assert one.shape == (6, 8, 8, 3) and one.dtype == np.uint8
    other_seed, _ = generate(module, den, sampler, 4, list(range(6)), labels, seed=6, batch_size=6, progress=False)
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
    args = ["--ckpt", ckpt, "--sampler", "heun", "--steps", "3", "--num", "12", "--batch-size", "5",
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
    (["--ig.interval", "[0.8,0.2]"], "--ig.interval"),
    (["--cfg.scale", "nan"], "guidance.cfg.scale"),
    (["--ig.scale", "-1"], "guidance.ig.scale"),
    (["--sampler", "ddim"], "--sampler"),
    (["--ag.scale", "2"], "guidance.autoguidance.scale"),
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


def test_a_config_that_disagrees_with_the_checkpoint_is_refused(tmp_path, capsys):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    ckpt = _save(_module(exits=(3,)), tmp_path / "m.ckpt")
    args = ["--ckpt", ckpt, "--out", str(tmp_path / "o"), "--num", "10", "--steps", "2", "--sampler", "euler"]
    assert main(args + ["--config", str(repo / "experiments/default.yaml")]) == 2  # default.yaml: exits [2]
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --config model.exits: [2]") and "[3]" in err
    assert not (tmp_path / "o").exists()
    matching = tmp_path / "exp.yaml"
    matching.write_text("model:\n  name: SiT-T/2\n  exits: [3]\n")
    assert main(args + ["--config", str(matching)]) == 0
