"""README "Extending igdit": a new backbone family, a loss term with its own weights, a guidance rule and a time grid,
each one class or function in tests/extending.py, reach training, checkpoints, FID settings, the end-of-run grid and
sampling through the real CLI; and Autoguidance is scored during training like any other rule."""
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from igdit.checkpoints import load_module
from igdit.cli import main
from igdit.data import load_meta

from helpers import REPO, short_config, tiny_module


@pytest.fixture(scope="module")
def guide_checkpoint(tmp_path_factory, digits_root):
    """A weak guide for Autoguidance: the default SiT-T/2 with small random weights and the digits' meta."""
    torch.manual_seed(1)
    module = tiny_module()
    with torch.no_grad():
        for p in module.backbone.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("guide") / "guide.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__, "igdit_data_meta": load_meta(digits_root)}, path)
    return path


@pytest.mark.slow
def test_a_new_backbone_term_and_guidance_rule_train_evaluate_save_and_sample(tmp_path, digits_root,
                                                                               guide_checkpoint, capsys):
    config = short_config(tmp_path / "base.yaml", max_steps=20, every=10, samples_per_class=1, grid_steps=2,
                          log_every_n_steps=5)
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["backbone"] = {"class_path": "extending.ToyDiT",
                                "init_args": {"size": "S/2", "exits": [1], "input_size": 8, "in_channels": 1}}
    # LossTerm's own fields (start_step) reach a term that declares only its own
    cfg["model"]["terms"]["align"] = {"class_path": "extending.ProjectedAlignment",
                                      "init_args": {"block": 2, "start_step": 5}}
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("FIDCallback"):
            cb["init_args"]["settings"] = {
                "none": {}, "ramp": {"extending.RampedInternalGuidance": {"scale": 2.0}},
                "ag": {"ag": {"scale": 1.5, "ckpt": str(guide_checkpoint)}}}
            cb["init_args"]["schedule"] = "extending.cosine_grid"
        if cb["class_path"].endswith("SampleGrid"):
            cb["init_args"] = {"samples_per_class": 1, "steps": 2, "settings": {
                "none": {}, "ramp": {"extending.RampedInternalGuidance": {"scale": 2.0}}}}
        if cb["class_path"].endswith("Checkpoint") and "monitor" in cb["init_args"]:
            cb["init_args"]["monitor"] = "fd_digits/ramp"
    config.write_text(yaml.safe_dump(cfg))
    runs, uri = tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["fit", "--config", str(config), "--data.root", str(digits_root), "--trainer.default_root_dir",
                 str(runs), "--trainer.logger.init_args.tracking_uri", uri]) == 0
    capsys.readouterr()

    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("igdit-digits").experiment_id])[0]
    for key in ("train/align", "train/ig_exit", "fd_digits/none", "fd_digits/ramp", "fd_digits/ag"):
        assert key in run.data.metrics, key
    align_steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/align")]
    assert align_steps and min(align_steps) >= 5  # off before its start_step
    assert "fid/schedule" in run.data.params and run.data.params["fid/schedule"] == "extending.cosine_grid"
    assert run.data.metrics["fd_digits/ramp"] != run.data.metrics["fd_digits/none"]
    assert run.data.params["backbone/class_path"] == "extending.ToyDiT"

    ckpt_path = next(runs.rglob("last.ckpt"))
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    ema, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    projector = "objective.align.projector.0.weight"
    assert projector in ema and projector in raw and not torch.equal(ema[projector], raw[projector])  # averaged
    assert not any("encoder" in key for key in ema)  # the frozen network is not saved
    assert checkpoint["hyper_parameters"]["frozen_networks"]["align.encoder"]["source"].startswith("random")

    module = load_module(ckpt_path)
    assert type(module.backbone).__name__ == "ToyDiT" and module.backbone.name == "ToyDiT-S/2"
    out = tmp_path / "samples"
    # a new rule and a new grid by their import paths: no igdit flag or registry was edited for them
    assert main(["sample", "--ckpt", str(ckpt_path), "--sampler", "euler", "--steps", "3", "--num", "10",
                 "--schedule", "extending.cosine_grid",
                 "--guidance", "{extending.RampedInternalGuidance: {scale: 2.0}}", "--out", str(out)]) == 0
    assert "NFE 3 per sample" in capsys.readouterr().out
    assert np.load(out / "samples.npz")["arr_0"].shape == (10, 8, 8, 3)


def test_a_new_time_grid_is_one_function_reached_by_its_import_path():
    from extending import cosine_grid

    from igdit.config import ConfigError
    from igdit.generation import Sampling
    from igdit.samplers import time_grid

    assert time_grid("extending.cosine_grid", 4) == cosine_grid(4)
    assert Sampling("heun", 4, "extending.cosine_grid").schedule == "extending.cosine_grid"
    with pytest.raises(ConfigError, match=r"^FIDCallback.schedule: 'cosine' is not allowed; choose a time grid: "
                                          r"uniform, sde, shifted or the import path"):
        Sampling.checked("FIDCallback.", "euler", 4, "cosine")
    with pytest.raises(ConfigError, match=r"^--steps: 1 is not allowed; the sde sampler needs at least 2 steps"):
        Sampling.checked("--", "sde", 1)


def test_the_worked_examples_need_no_edit_elsewhere():
    """Each example is reached only through its class_path: igdit itself never names them."""
    igdit_sources = "\n".join(p.read_text() for p in (REPO / "igdit").rglob("*.py"))
    for name in ("ToyDiT", "ProjectedAlignment", "RampedInternalGuidance", "ig_ramp", "cosine_grid"):
        assert name not in igdit_sources
