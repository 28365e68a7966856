"""Checkpoints: reading igdit's own (safely, old layouts included: ``igdit.models.loading``) into a whole
IGDiTModule; the official ones are imported by ``igdit.official``.

``load_module`` rebuilds an ``IGDiTModule`` from any igdit checkpoint with ``torch.load(weights_only=True)``:
its hyper-parameters are the model's config (class_path dicts), and checkpoints written before the parts were
injected (a backbone *name*, ``diffusion_loss`` / ``exit_loss`` / ``optimizer`` dicts) are converted on load.
An imported official checkpoint carries its decoder and normaliser (``igdit_data_meta``) like a trained one.
A network that is only read (a teacher, a guide) loads as a backbone with ``igdit.models.load_backbone``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from igdit.models.loading import WEIGHTS, model_config, read_checkpoint, weights_of
from igdit.module import build_module

__all__ = ["WEIGHTS", "load_module", "model_config", "read_checkpoint"]


def load_module(path: str | Path, field: str = "--ckpt", device: str | torch.device = "cpu",
                weights: str = "ema"):
    """An IGDiTModule (in eval mode, on ``device``) from an igdit checkpoint.

    weights: "ema" (the checkpoint's ``state_dict``, where EMAWeightAveraging puts the averaged weights) or
    "raw" (``current_model_state``, the weights the optimiser trained). The shards' meta.json (encoder and
    normaliser) comes back as ``module.data_meta``.
    """
    checkpoint = read_checkpoint(path, field)
    module = build_module(model_config(checkpoint["hyper_parameters"]))
    module.load_state_dict(weights_of(checkpoint, weights, field, path), strict=True)
    module.data_meta = checkpoint.get("igdit_data_meta")
    return module.eval().to(device)
