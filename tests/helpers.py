"""Helpers shared by the end-to-end tests (a shortened default experiment, a free TCP port)."""
import socket
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def short_config(path: Path, max_steps: int, every: int, samples_per_class: int, grid_steps: int,
                 extra_callbacks: list | None = None, **trainer) -> Path:
    """The default experiment, shortened for a test and written to ``path``: max_steps, validation and
    checkpoints and FID (100 samples, 2 steps) every ``every`` steps, EMA from the first step, a smaller grid."""
    cfg = yaml.safe_load((REPO / "experiments/default.yaml").read_text())
    cfg["trainer"].update(max_steps=max_steps, val_check_interval=every, enable_progress_bar=False, **trainer)
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("EMAWeightAveraging"):
            cb["init_args"].update(decay=0.9, update_starting_at_step=0)
        if cb["class_path"].endswith("Checkpoint") and "every_n_train_steps" in cb["init_args"]:
            cb["init_args"]["every_n_train_steps"] = every  # the periodic one; the best-FD one saves per evaluation
        if cb["class_path"].endswith("SampleGrid"):
            cb["init_args"].update(samples_per_class=samples_per_class, steps=grid_steps)
        if cb["class_path"].endswith("FIDCallback"):
            cb["init_args"].update(every_n_steps=every, num_samples=100, steps=2)
    cfg["trainer"]["callbacks"] += extra_callbacks or []
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_config(**changes) -> dict:
    """The default experiment's ``model:`` section (SiT-T/2 on 8x8 digits, IG exit after block 2), with
    ``changes`` merged in: ``backbone`` entries go into the backbone's init_args, the rest replace sections."""
    cfg = yaml.safe_load((REPO / "experiments/default.yaml").read_text())["model"]
    cfg["backbone"]["init_args"].update(changes.pop("backbone", {}))
    cfg.update(changes)
    return cfg


def tiny_module(**changes):
    """An IGDiTModule built from ``model_config(**changes)`` exactly as the CLI builds it."""
    from igdit.module import build_module

    return build_module(model_config(**changes))
