"""Checkpoints: reading igdit's own (safely, old layouts included) and importing the official SiT+IG ones.

``load_module`` rebuilds an ``IGDiTModule`` from any igdit checkpoint with ``torch.load(weights_only=True)``:
its hyper-parameters are the model's config (class_path dicts), and checkpoints written before the parts were
injected (a backbone *name*, ``diffusion_loss`` / ``exit_loss`` / ``optimizer`` dicts) are converted on load.

``import_official_sit`` reads a checkpoint written by the public SiT+IG `train.py` (a dict with `model`, `ema`,
`opt`, `args`, `epoch`, `steps`) or a bare state dict (name -> tensor, as released weights often are), checks
every key and shape against the igdit backbone before loading anything, and writes a checkpoint that
``load_module`` and ``IGDiTModule.load_from_checkpoint`` reload. igdit's parameter names are the official
ones, so no key is renamed. Official SiT uses the path x_t = (1 - t) x + t eps with t = 1 as noise, exactly
as igdit (METHOD.md §2.3), so no time conversion is needed either.
"""
from __future__ import annotations

import argparse
import math
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning
import torch
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from igdit.config import ConfigError
from igdit.models import BACKBONES
from igdit.module import build_module

SOURCE_FIELD = "--from official-sit"
WEIGHTS = ("ema", "raw")
OFFICIAL_WEIGHTS = ("ema", "model")  # the keys of an official training checkpoint
DEFAULTS = {"input_size": 32, "in_channels": 4, "num_classes": 1000}  # ImageNet 256, SD-VAE latents
_FLAGS = {"input_size": "--input-size", "in_channels": "--in-channels", "num_classes": "--num-classes"}


def _plain(value: Any) -> Any:
    """`value` if it is built of plain values only (None, bool, int, float, str, lists/tuples/dicts), else None."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        if any(i is None and v is not None for i, v in zip(items, value)):
            return None
        return list(items) if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        items = {k: _plain(v) for k, v in value.items() if isinstance(k, str)}
        ok = len(items) == len(value) and all(items[k] is not None or value[k] is None for k in items)
        return items if ok else None
    return None


def _plain_args(args: Any) -> dict[str, Any]:
    """The training args (argparse.Namespace or dict) as a dict of plain values; other values are dropped."""
    if args is None:
        return {}
    raw = vars(args) if isinstance(args, argparse.Namespace) else (args if isinstance(args, dict) else {})
    out = {}
    for key, value in raw.items():
        plain = _plain(value)
        if isinstance(key, str) and (plain is not None or value is None):
            out[key] = plain
    return out


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_ddp_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DDP-wrapped model's keys without their ``module.`` prefix."""
    state = OrderedDict(state)
    consume_prefix_in_state_dict_if_present(state, "module.")
    return dict(state)


def load_official_sit(path: str | Path, weights: str = "ema") -> tuple[dict[str, torch.Tensor], dict]:
    """Read an official SiT+IG checkpoint (or a bare state dict) without executing arbitrary pickles.

    Returns (state dict of the chosen weights, info) where info holds ``layout`` ("checkpoint" or
    "state_dict"), ``weights``, ``args`` (the training args as a plain dict, {} if absent), ``steps`` and
    ``epoch`` (None if absent). A ``module.`` prefix (DDP) is stripped.
    """
    if weights not in OFFICIAL_WEIGHTS:
        raise ConfigError("--weights", weights, "choose one of " + ", ".join(repr(w) for w in OFFICIAL_WEIGHTS))
    path = Path(path)
    if not path.is_file():
        raise ConfigError(SOURCE_FIELD, str(path), "no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(SOURCE_FIELD, str(path),
                          f"could not be read with torch.load(weights_only=True): {first}") from None

    if _is_state_dict(obj):
        if weights != "ema":
            raise ConfigError("--weights", weights, "this file is a bare state dict with a single set of weights "
                                                    "(released weights are the EMA); leave --weights at 'ema'")
        info = {"layout": "state_dict", "weights": "state_dict", "args": {}, "steps": None, "epoch": None}
        return _strip_ddp_prefix(dict(obj)), info
    if not isinstance(obj, dict):
        raise ConfigError(SOURCE_FIELD, str(path),
                          f"expected a dict (checkpoint or state dict), found {type(obj).__name__}")
    state = obj.get(weights)
    if not _is_state_dict(state):
        present = ", ".join(repr(k) for k in obj) or "none"
        raise ConfigError(SOURCE_FIELD, str(path),
                          f"has no '{weights}' state dict (--weights {weights}); keys present: {present}")
    steps, epoch = obj.get("steps"), obj.get("epoch")
    info = {"layout": "checkpoint", "weights": weights, "args": _plain_args(obj.get("args")),
            "steps": int(steps) if isinstance(steps, (int, float)) else None,
            "epoch": int(epoch) if isinstance(epoch, (int, float)) else None}
    return _strip_ddp_prefix(dict(state)), info


def infer_shapes(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """input_size, in_channels, num_classes (those that can be read) from the state dict's shapes.

    ``x_embedder.proj.weight`` (D, C, p, p) gives C and p; ``pos_embed`` (1, T, D) with T = (input_size/p)^2
    gives input_size; ``y_embedder.embedding_table.weight`` (num_classes + 1, D) gives num_classes.
    """
    out = {}
    proj, pos, table = (state.get(k) for k in ("x_embedder.proj.weight", "pos_embed",
                                                "y_embedder.embedding_table.weight"))
    patch = None
    if proj is not None and proj.dim() == 4 and proj.shape[2] == proj.shape[3]:
        out["in_channels"], patch = int(proj.shape[1]), int(proj.shape[2])
    if pos is not None and pos.dim() == 3 and patch is not None:
        side = math.isqrt(int(pos.shape[1]))
        if side * side == pos.shape[1]:
            out["input_size"] = side * patch
    if table is not None and table.dim() == 2 and table.shape[0] >= 2:
        out["num_classes"] = int(table.shape[0]) - 1
    return out


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], model_name: str,
                     exits: Sequence[int]) -> None:
    """Raise a one-line ConfigError at the first key (model order, then checkpoint order) that does not fit."""
    def fail(key: str, message: str):
        if key.startswith("final_layer_xr"):
            raise ConfigError("--exit", list(exits), f"does not fit the checkpoint: {message}")
        raise ConfigError("--model", model_name, f"does not fit the checkpoint: {message}")

    for key, tensor in expected.items():
        if key not in state:
            fail(key, f"{key} missing in checkpoint")
        if _shape(state[key]) != _shape(tensor):
            fail(key, f"{key} has shape {_shape(state[key])} in the checkpoint, the model expects {_shape(tensor)}")
    for key in state:
        if key not in expected:
            fail(key, f"{key} unexpected in checkpoint (the model has no such parameter)")


def import_official_sit(path: str | Path, model_name: str, exits: list[int], out: str | Path, *,
                        input_size: Optional[int] = None, in_channels: Optional[int] = None,
                        num_classes: Optional[int] = None, weights: str = "ema",
                        overwrite: bool = False) -> Path:
    """Convert an official SiT+IG checkpoint into an igdit Lightning checkpoint at ``out``; returns ``out``.

    input_size, in_channels, num_classes: inferred from the state dict's shapes; an explicitly passed value
    that disagrees is a ConfigError; None and not inferable falls back to 32 / 4 / 1000 (ImageNet 256,
    SD-VAE latents). qk-norm is switched on when the checkpoint holds ``blocks.0.attn.q_norm.weight``.
    With one exit, the official ``args.encoder_depth`` (if present) must equal it: the official head name
    ``final_layer_xr`` does not say which block it reads.
    Every key and shape is checked before anything is loaded. Time needs no conversion: official SiT
    uses t = 1 as noise, like igdit (METHOD.md §2.3).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError("--out", str(out), "already exists; pass --overwrite to replace it")
    if model_name not in BACKBONES:
        raise ConfigError("--model", model_name, "choose one of " + ", ".join(BACKBONES))
    family, size = BACKBONES[model_name]
    state, info = load_official_sit(path, weights)

    explicit = {"input_size": input_size, "in_channels": in_channels, "num_classes": num_classes}
    inferred = infer_shapes(state)
    sizes = {}
    for key, value in explicit.items():
        if value is not None and key in inferred and value != inferred[key]:
            raise ConfigError(_FLAGS[key], value, f"the checkpoint's shapes say {key} = {inferred[key]}")
        sizes[key] = inferred.get(key, value if value is not None else DEFAULTS[key])

    exits = [int(e) for e in exits]
    encoder_depth = info["args"].get("encoder_depth")
    if len(exits) == 1 and isinstance(encoder_depth, int) and encoder_depth != exits[0]:
        raise ConfigError("--exit", exits[0], f"the checkpoint's args say its IG head reads block {encoder_depth} "
                                              f"(encoder_depth); pass --exit {encoder_depth}")

    # A patch size that does not divide the latent side cannot even be built: report it as the shape mismatch.
    arch = family.sizes[size]
    proj = state.get("x_embedder.proj.weight")
    if proj is not None and sizes["input_size"] % arch["patch_size"]:
        want = (arch["hidden_size"], sizes["in_channels"], arch["patch_size"], arch["patch_size"])
        raise ConfigError("--model", model_name, f"does not fit the checkpoint: x_embedder.proj.weight has shape "
                                                 f"{_shape(proj)} in the checkpoint, the model expects {want}")

    backbone = {"class_path": f"{family.__module__}.{family.__qualname__}",
                "init_args": {"size": size, "exits": exits, "qk_norm": "blocks.0.attn.q_norm.weight" in state, **sizes}}
    module = build_module({"backbone": backbone})
    check_state_dict(state, module.backbone.state_dict(), model_name, exits)
    module.backbone.load_state_dict(state, strict=True)

    steps = info["steps"] or 0
    checkpoint = {
        "state_dict": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "epoch": info["epoch"] or 0,
        "global_step": steps,
        "igdit_import": {"source": "official-sit", "path": str(path), "weights": info["weights"],
                         "layout": info["layout"], "args": info["args"]},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(out)  # never leave a half-written checkpoint at `out`
    return out


# ---- igdit's own checkpoints ---------------------------------------------------------------------------
def read_checkpoint(path: str | Path, field: str = "--ckpt") -> dict:
    """An igdit checkpoint read with ``torch.load(weights_only=True)`` (no pickled code runs, whatever
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says); one-line ConfigError for a missing, foreign or damaged file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(field, str(path), "is not a file; pass an igdit checkpoint (.ckpt), e.g. "
                                            "runs/<experiment>/<run>/checkpoints/last.ckpt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ConfigError(field, str(path), f"is not a readable igdit checkpoint (torch.load with "
                                            f"weights_only=True: {first})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ConfigError(field, str(path), "is not an igdit checkpoint (no state_dict and hyper_parameters); "
                                            "import official checkpoints with `igdit import-ckpt`")
    return checkpoint


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


def load_module(path: str | Path, field: str = "--ckpt", device: str | torch.device = "cpu",
                weights: str = "ema"):
    """An IGDiTModule (in eval mode, on ``device``) from an igdit checkpoint.

    weights: "ema" (the checkpoint's ``state_dict``, where EMAWeightAveraging puts the averaged weights) or
    "raw" (``current_model_state``, the weights the optimiser trained). The shards' meta.json (encoder and
    normaliser) comes back as ``module.data_meta``.
    """
    checkpoint = read_checkpoint(path, field)
    module = build_module(model_config(checkpoint["hyper_parameters"]))
    if weights not in WEIGHTS:
        raise ConfigError(f"{field} weights", weights, "choose ema or raw")
    state = checkpoint["state_dict"] if weights == "ema" else checkpoint.get("current_model_state")
    if state is None:
        raise ConfigError(field, str(path), "holds one set of weights (no current_model_state); use its EMA weights")
    module.load_state_dict(state, strict=True)
    module.data_meta = checkpoint.get("igdit_data_meta")
    return module.eval().to(device)
