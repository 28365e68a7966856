"""Frozen networks load as backbones: a backbone and its weights read from an igdit checkpoint, without building the
training module (a teacher, a guide, an imported model needs the network, not the LightningModule around it).

``read_checkpoint`` reads any igdit checkpoint with ``torch.load(weights_only=True)``; ``model_config`` gives its model
section (older layouts converted); ``load_backbone`` builds the backbone from that section and loads its EMA or raw
weights. ``igdit.checkpoints.load_module`` builds the whole IGDiTModule from the same two readers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from igdit.config import ConfigError, instantiate
from igdit.models.base import BACKBONES, Backbone

WEIGHTS = ("ema", "raw")
BACKBONE_PREFIX = "backbone."


def read_checkpoint(path: str | Path, field: str = "--ckpt", mmap: bool = False) -> dict:
    """An igdit checkpoint read with ``torch.load(weights_only=True)`` (no pickled code runs, whatever
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says); one-line ConfigError for a missing, foreign or damaged file.
    ``mmap``: map the tensors instead of reading them (cheap, for looking at a checkpoint's metadata)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(field, str(path), "is not a file; pass an igdit checkpoint (.ckpt), e.g. "
                                            "runs/<experiment>/<run>/checkpoints/last.ckpt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # any file that is not a whole, safe torch checkpoint (a text file fails with KeyError)
        raise ConfigError(field, str(path), f"is not a readable igdit checkpoint: torch.load with weights_only=True "
                                            f"says {load_failure(err)}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ConfigError(field, str(path), "is not an igdit checkpoint (no state_dict and hyper_parameters); "
                                            "import official checkpoints with `igdit import-ckpt`")
    return checkpoint


def load_failure(err: Exception) -> str:
    """What torch.load said, in whole sentences on one line: the reason it refused unsafe content (the global it
    would have imported) rather than its advice to turn the check off."""
    text = " ".join(str(err).split())
    unsafe = text.find("Unsupported global")
    if unsafe >= 0:  # "...WeightsUnpickler error: Unsupported global: GLOBAL x.y was not an allowed global by default."
        end = text.find(". ", unsafe)
        return text[unsafe:end + 1 if end >= 0 else len(text)] + " (the file would run code when unpickled)"
    if not text or len(text) < 8:
        return f"{type(err).__name__}({text}): the file is not a torch checkpoint"
    return text if len(text) <= 200 else text[:text.rfind(" ", 0, 200)] + " ..."


def model_config(hparams: dict) -> dict:
    """The model's config (the ``model:`` section of an experiment) from a checkpoint's hyper-parameters.

    Checkpoints written before the parts were injected store a backbone *name* and ``diffusion_loss``,
    ``exit_loss`` and ``optimizer`` dicts; they are converted to the same model: those terms under the names
    they were logged with, AdamW with the same values and the same linear warm-up.
    """
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_") and k != "frozen_networks"}
    if "backbone" in hparams:
        return hparams
    family, size = BACKBONES[hparams["name"]]
    backbone = {"class_path": f"{family.__module__}.{family.__qualname__}", "init_args": {
        "size": size, "exits": list(hparams["exits"]), "input_size": hparams["input_size"],
        "in_channels": hparams["in_channels"], "num_classes": hparams["num_classes"],
        "qk_norm": hparams.get("qk_norm", False)}}
    terms = {"diffusion": {"class_path": "igdit.objectives.DiffusionLoss", "init_args": hparams["diffusion_loss"]},
             "ig_exit": {"class_path": "igdit.objectives.ExitLoss", "init_args": hparams["exit_loss"]}}
    optimizer = dict(hparams["optimizer"])
    warmup = optimizer.pop("warmup_steps", 0)
    return {"backbone": backbone, "terms": terms,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": optimizer},
            "lr_scheduler": {"class_path": "igdit.optim.LinearWarmup", "init_args": {"warmup_steps": warmup}}
            if warmup else None,
            "class_dropout": hparams.get("class_dropout", 0.1), "transport": hparams.get("transport", {}),
            "compile": hparams.get("compile", False)}


def weights_of(checkpoint: dict, weights: str, field: str, path: str | Path) -> dict:
    """The checkpoint's EMA weights (``state_dict``, where EMAWeightAveraging puts them) or raw weights
    (``current_model_state``, what the optimiser trained), as a state dict of the whole module."""
    if weights not in WEIGHTS:
        raise ConfigError(f"{field} weights", weights, "choose ema or raw")
    state = checkpoint["state_dict"] if weights == "ema" else checkpoint.get("current_model_state")
    if state is None:
        raise ConfigError(field, str(path), "holds one set of weights (no current_model_state); use its EMA weights")
    return state


def load_backbone(path: str | Path, field: str = "--ckpt", device: str | torch.device = "cpu",
                  weights: Literal["ema", "raw"] = "ema") -> Backbone:
    """The backbone of an igdit checkpoint (in eval mode, on ``device``) with its EMA or raw weights (``weights_of``);
    the loss terms, optimiser and training state are not built."""
    checkpoint = read_checkpoint(path, field)
    backbone = instantiate(Backbone, model_config(checkpoint["hyper_parameters"])["backbone"], "model.backbone")
    state = weights_of(checkpoint, weights, field, path)
    backbone.load_state_dict({k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)},
                             strict=True)
    return backbone.eval().to(device)
