"""Importing the official SiT+IG and LightningDiT+IG checkpoints as igdit checkpoints that sample and evaluate
like trained ones (``igdit import-ckpt``).

Each format (``FORMATS``) is the layout one public ``train.py`` writes — a dict with ``model``/``ema``/``opt`` and
``args`` (SiT, an ``argparse.Namespace``) or ``config`` (LightningDiT, the training yaml), or a bare state dict
(released weights often are), with or without DDP's ``module.`` prefix — plus the paper's defaults for what a
bare state dict does not say: the model, its exit block, the image resolution, the VAE and the latent
normalisation. The import

  1. reads the file with ``torch.load(weights_only=True)`` (``argparse.Namespace`` allowed, nothing executed),
  2. infers the backbone: family from the format; size from the training args/config, else from the shapes
     (depth, width, patch); input size, channels and classes from the shapes; exits from ``--exit``, else the
     args/config's ``encoder_depth``, else the paper's 8; LightningDiT's switches from its config (the
     released recipe's otherwise); qk-norm from the keys,
  3. checks every key and shape against that backbone and names the first mismatch with both shapes,
  4. loads the decoder (``--vae``, else the format's) from a local path or the hub cache and checks that its
     latent channels and downsampling fit the model (latent side x downsampling = the training resolution),
  5. builds the normaliser (``--latent_stats``, else the format's) and writes a Lightning checkpoint whose
     ``igdit_data_meta`` holds the decoder description and normaliser, as a trained checkpoint's does.

Nothing is written unless every step passed. igdit's parameter names are the official ones (no key is
renamed). Time: SiT uses t = 1 as noise like igdit; LightningDiT uses t = 0 as noise, which its backbone class
converts in ``Backbone.forward`` (docs/design.md, contract 1) — the weights are loaded as they are.
"""
from __future__ import annotations

import argparse
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from igdit.checkpoints import load_failure
from igdit.config import ConfigError
from igdit.data.encoders import LatentNormalizer, build_encoder, load_latent_stats
from igdit.models import BACKBONES, Backbone, LightningDiT, SiT
from igdit.models.base import check_exits

WEIGHTS = ("ema", "model")  # the weight sets of an official training checkpoint
_FLAGS = {"input_size": "--input_size", "in_channels": "--in_channels", "num_classes": "--num_classes"}


@dataclass(frozen=True)
class OfficialFormat:
    """What one public code base writes, and the paper's defaults for what its files do not say.

    family: the igdit backbone class (same parameter names). model: the released model. exit: the released
    exit block. sizes: input_size, in_channels, num_classes of the released model. resolution: image side the
    latents decode to. vae: the decoder (an ``igdit data build --encoder`` spec). latent_stats: whether the
    default normaliser comes from a ``latents_stats.pt`` (LightningDiT) or from the VAE (SiT: 0.18215).
    config_key: where the training options live in a checkpoint (``args`` or ``config``).
    """

    name: str
    family: type[Backbone]
    model: str
    exit: int
    sizes: dict = field(default_factory=dict)
    resolution: int = 256
    vae: str = "sd-vae-ft-ema"
    latent_stats: bool = False
    config_key: str = "args"


FORMATS = {
    "official-sit": OfficialFormat("official-sit", SiT, "SiT-XL/2", 8,
                                   {"input_size": 32, "in_channels": 4, "num_classes": 1000}),
    "official-lightningdit": OfficialFormat("official-lightningdit", LightningDiT, "LightningDiT-XL/1", 8,
                                            {"input_size": 16, "in_channels": 32, "num_classes": 1000},
                                            vae="vavae-f16d32", latent_stats=True, config_key="config"),
}
DEFAULT_WEIGHTS = "ema"
IMPORT_STAGES = ("read", "checked keys and shapes", "loaded decoder and normaliser", "written")


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
    """Training options (argparse.Namespace or a nested dict) as plain values; other values are dropped."""
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


def load_official(path: str | Path, fmt: str = "official-sit", weights: str = DEFAULT_WEIGHTS
                  ) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an official checkpoint (or a bare state dict) without executing arbitrary pickles.

    Returns (state dict of the chosen weights, info) where info holds ``layout`` ("checkpoint" or
    "state_dict"), ``weights``, ``args`` (the training args or config as a plain dict, {} if absent), ``steps``
    and ``epoch`` (None if absent; LightningDiT names its files by step, ``0600000.pt``). ``module.`` is stripped.
    """
    source = f"--from {fmt}"
    if weights not in WEIGHTS:
        raise ConfigError("--weights", weights, "choose one of " + ", ".join(repr(w) for w in WEIGHTS))
    path = Path(path)
    if not path.is_file():
        raise ConfigError(source, str(path), "no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any file that is not a whole, safe torch checkpoint (a text file fails with KeyError)
        raise ConfigError(source, str(path), f"could not be read with torch.load(weights_only=True): "
                                             f"{load_failure(err)}") from None

    if _is_state_dict(obj):
        if weights != DEFAULT_WEIGHTS:
            raise ConfigError("--weights", weights, "this file is a bare state dict with a single set of weights "
                                                    "(released weights are the EMA); leave --weights at 'ema'")
        info = {"layout": "state_dict", "weights": "state_dict", "args": {}, "steps": None, "epoch": None}
        return _strip_ddp_prefix(dict(obj)), info
    if not isinstance(obj, dict):
        raise ConfigError(source, str(path), f"expected a dict (checkpoint or state dict), found {type(obj).__name__}")
    state = obj.get(weights)
    if not _is_state_dict(state):
        present = ", ".join(repr(k) for k in obj) or "none"
        raise ConfigError(source, str(path), f"has no '{weights}' state dict (--weights {weights}); keys present: {present}")
    steps, epoch = obj.get("steps"), obj.get("epoch")
    if not isinstance(steps, (int, float)) and path.stem.isdigit():
        steps = int(path.stem)  # LightningDiT's train.py saves f"{train_steps:07d}.pt"
    options = obj.get("args") if obj.get("args") is not None else obj.get("config")
    info = {"layout": "checkpoint", "weights": weights, "args": _plain_args(options),
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


def infer_size(state: dict[str, torch.Tensor], family: type[Backbone]) -> Optional[str]:
    """The registered size of ``family`` whose depth, width and patch the state dict has, or None."""
    proj = state.get("x_embedder.proj.weight")
    if proj is None or proj.dim() != 4:
        return None
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    width, patch = int(proj.shape[0]), int(proj.shape[2])
    return next((size for size, arch in family.sizes.items()
                 if (arch["depth"], arch["hidden_size"], arch["patch_size"]) == (depth, width, patch)), None)


def looks_like(state: dict[str, torch.Tensor]) -> str:
    """The format whose layout the keys have: LightningDiT's RMSNorm gains, SwiGLU or RoPE tables, else SiT."""
    markers = ("feat_rope.freqs_cos", "blocks.0.norm1.weight", "blocks.0.mlp.w12.weight")
    return "official-lightningdit" if any(k in state for k in markers) else "official-sit"


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], model_name: str,
                     exits: Sequence[int], hint: str = "") -> None:
    """Raise a one-line ConfigError at the first key (model order, then checkpoint order) that does not fit,
    naming it with both shapes (or the one it has)."""
    def fail(key: str, message: str):
        if key.startswith("final_layer_xr"):
            raise ConfigError("--exit", list(exits), f"does not fit the checkpoint: {message}{hint}")
        raise ConfigError("--model", model_name, f"does not fit the checkpoint: {message}{hint}")

    for key, tensor in expected.items():
        if key not in state:
            fail(key, f"{key} missing in checkpoint (the model expects shape {_shape(tensor)})")
        if _shape(state[key]) != _shape(tensor):
            fail(key, f"{key} has shape {_shape(state[key])} in the checkpoint, the model expects {_shape(tensor)}")
    for key in state:
        if key not in expected:
            fail(key, f"{key} unexpected in checkpoint (shape {_shape(state[key])}; the model has no such parameter)")


def _lightningdit_options(config: dict, state: dict, source: str) -> dict:
    """LightningDiT's architecture switches from its training config (``model:``), else the released recipe's
    (SwiGLU, RoPE, RMSNorm on, learned sigma off); qk-norm from the keys."""
    model = config.get("model", {}) if isinstance(config.get("model"), dict) else {}
    if model.get("wo_shift"):
        raise ConfigError(source, "wo_shift", "the checkpoint was trained with wo_shift (adaLN without shift), "
                                              "which igdit's LightningDiT does not implement")
    transport = config.get("transport", {}) if isinstance(config.get("transport"), dict) else {}
    if transport.get("path_type", "Linear") != "Linear" or transport.get("prediction", "velocity") != "velocity":
        raise ConfigError(source, f"{transport.get('path_type')}/{transport.get('prediction')}",
                          "igdit imports LightningDiT trained on the Linear path with velocity prediction")
    proj, final = state.get("x_embedder.proj.weight"), state.get("final_layer.linear.weight")
    learn_sigma = bool(model.get("learn_sigma", False))
    if proj is not None and final is not None and proj.dim() == 4:
        learn_sigma = int(final.shape[0]) == 2 * int(proj.shape[1]) * int(proj.shape[2]) ** 2
    return {"use_swiglu": bool(model.get("use_swiglu", True)), "use_rope": bool(model.get("use_rope", True)),
            "use_rmsnorm": bool(model.get("use_rmsnorm", True)),
            "qk_norm": bool(model.get("use_qknorm", "blocks.0.attn.q_norm.weight" in state)),
            "learn_sigma": learn_sigma}


def _training_facts(fmt: OfficialFormat, args: dict) -> dict:
    """What the official args/config say about the model and data, in igdit's terms (absent keys omitted)."""
    facts: dict[str, Any] = {}
    if fmt.config_key == "args":  # SiT/train.py's argparse options
        for key, name in (("model", "model"), ("encoder_depth", "exit"), ("resolution", "resolution"),
                          ("num_classes", "num_classes"), ("path_type", "path")):
            if args.get(key) is not None:
                facts[name] = args[key]
        return facts
    model, data, vae = (args.get(k) if isinstance(args.get(k), dict) else {} for k in ("model", "data", "vae"))
    for key, name, part in (("model_type", "model", model), ("encoder_depth", "exit", model),
                            ("in_chans", "in_channels", model), ("image_size", "resolution", data),
                            ("num_classes", "num_classes", data), ("latent_multiplier", "latent_multiplier", data),
                            ("latent_norm", "latent_norm", data), ("downsample_ratio", "downsampling", vae)):
        if part.get(key) is not None:
            facts[name] = part[key]
    if data:  # train.py's defaults when the config has a data section without them
        facts.setdefault("latent_multiplier", 0.18215)
        facts.setdefault("latent_norm", False)
    return facts


def _resolve_model(fmt: OfficialFormat, state: dict, facts: dict, model: Optional[str]) -> str:
    source = f"--from {fmt.name}"
    if model is None:
        named = facts.get("model")
        if isinstance(named, str) and named in BACKBONES and BACKBONES[named][0] is fmt.family:
            model = named
        else:
            size = infer_size(state, fmt.family)
            model = f"{fmt.family.family}-{size}" if size is not None else fmt.model
    if model not in BACKBONES:
        raise ConfigError("--model", model, "choose one of " + ", ".join(n for n, (f, _) in BACKBONES.items()
                                                                      if f is fmt.family))
    if BACKBONES[model][0] is not fmt.family:
        raise ConfigError("--model", model, f"is not a {fmt.family.family} model; {source} imports "
                                            f"{fmt.family.family} checkpoints")
    return model


def infer_backbone(state: dict, info: dict, fmt: OfficialFormat, model: Optional[str] = None,
                   exits: Optional[Sequence[int]] = None, **explicit: Optional[int]) -> tuple[str, dict, dict]:
    """(model name, backbone config {class_path, init_args}, training facts) for the state dict.

    explicit: input_size, in_channels, num_classes from the command line; a value that disagrees with the shapes
    is a ConfigError, None takes the shapes', else the format's default.
    """
    source = f"--from {fmt.name}"
    facts = _training_facts(fmt, info["args"])
    name = _resolve_model(fmt, state, facts, model)
    family, size = BACKBONES[name]
    inferred = infer_shapes(state)
    sizes = {}
    for key, value in explicit.items():
        if value is not None and key in inferred and value != inferred[key]:
            raise ConfigError(_FLAGS[key], value, f"the checkpoint's shapes say {key} = {inferred[key]}")
        sizes[key] = inferred.get(key, value if value is not None else facts.get(key, fmt.sizes[key]))

    has_head = any(k.startswith("final_layer_xr") for k in state)
    if exits is None:
        config_exit = facts.get("exit")
        exits = [int(config_exit)] if isinstance(config_exit, int) else ([fmt.exit] if has_head else [])
        depth = family.sizes[size]["depth"]
        if exits and not exits[0] < depth:
            raise ConfigError("--exit", exits[0], f"the paper's exit block does not fit this {depth}-block model; "
                                                  "pass --exit <block>")
    exits = [int(e) for e in exits]
    try:  # the backbone would refuse it as model.backbone.exits; the user typed --exit
        check_exits(exits, family.sizes[size]["depth"])
    except ConfigError as err:
        raise ConfigError("--exit", err.value, err.allowed) from None
    config_exit = facts.get("exit")
    if len(exits) == 1 and isinstance(config_exit, int) and config_exit != exits[0]:
        raise ConfigError("--exit", exits[0], f"the checkpoint's {fmt.config_key} say its IG head reads block "
                                              f"{config_exit} (encoder_depth); pass --exit {config_exit}")

    # A patch size that does not divide the latent side cannot even be built: report it as the shape mismatch.
    arch = family.sizes[size]
    proj = state.get("x_embedder.proj.weight")
    if proj is not None and sizes["input_size"] % arch["patch_size"]:
        want = (arch["hidden_size"], sizes["in_channels"], arch["patch_size"], arch["patch_size"])
        raise ConfigError("--model", name, f"does not fit the checkpoint: x_embedder.proj.weight has shape "
                                           f"{_shape(proj)} in the checkpoint, the model expects {want}")
    init_args: dict[str, Any] = {"size": size, "exits": exits, **sizes}
    if family is LightningDiT:
        init_args.update(_lightningdit_options(info["args"], state, source))
    else:
        init_args["qk_norm"] = "blocks.0.attn.q_norm.weight" in state
    backbone = {"class_path": f"{family.__module__}.{family.__qualname__}", "init_args": init_args}
    return name, backbone, facts


def _decoder(fmt: OfficialFormat, vae: str, facts: dict, latent_shape: tuple, resolution: Optional[int],
             latent_stats: Optional[str], latent_multiplier: Optional[float]) -> tuple[Any, LatentNormalizer, dict]:
    """(encoder, normaliser, how the normaliser was obtained), checked against the model's latents."""
    channels, side = latent_shape[0], latent_shape[1]
    try:
        encoder = build_encoder(vae)
    except ConfigError as err:  # the same one line, on the flag the user can change
        raise ConfigError("--vae", vae, f"{err.allowed} ({err.field}: {err.value!r})") from None
    if encoder.name == "identity":
        raise ConfigError("--vae", vae, "the official models generate VAE latents; pass a VAE")
    if encoder.channels != channels:
        raise ConfigError("--vae", vae, f"has {encoder.channels} latent channels; the model denoises {channels}-channel "
                                        "latents")
    trained_at = resolution or facts.get("resolution") or fmt.resolution
    if "downsampling" in facts and int(facts["downsampling"]) != encoder.factor:
        raise ConfigError("--vae", vae, f"downsamples by {encoder.factor}; the checkpoint was trained on a VAE that "
                                        f"downsamples by {facts['downsampling']}")
    if encoder.factor * side != trained_at:
        raise ConfigError("--vae", vae, f"downsamples by {encoder.factor}: the model's {side}x{side} latents would "
                          f"decode to {encoder.factor * side} px, but it was trained at {trained_at} px (a VAE that "
                          f"downsamples by {trained_at / side:g}; or pass --resolution)")
    multiplier = float(latent_multiplier if latent_multiplier is not None else facts.get("latent_multiplier", 1.0))
    if latent_stats is not None:
        normalizer = load_latent_stats(latent_stats, multiplier)
        fit = {"method": "latent-stats", "file": str(Path(latent_stats).resolve()), "multiplier": multiplier,
               "rule": "x = (z - mean) / std * multiplier"}
    elif fmt.latent_stats and facts.get("latent_norm", True) is False:  # latent_norm: false -> multiplier only
        normalizer = LatentNormalizer([0.0] * channels, [multiplier] * channels)
        fit = {"method": "multiplier", "multiplier": multiplier}
    else:
        try:
            normalizer = encoder.normalizer(channels)
        except ConfigError as err:
            raise ConfigError("--latent_stats", None, f"{err.allowed}; or pass --latent_stats <file>") from None
        fit = {"method": "encoder"}
    if len(normalizer.shift) != channels:
        raise ConfigError("--latent_stats", latent_stats, f"holds statistics of {len(normalizer.shift)} channels; "
                                                          f"the model's latents have {channels}")
    return encoder, normalizer, fit


def import_official(path: str | Path, fmt: str, out: str | Path, *, model: Optional[str] = None,
                    exits: Optional[Sequence[int]] = None, vae: Optional[str] = "default",
                    latent_stats: Optional[str] = None, latent_multiplier: Optional[float] = None,
                    resolution: Optional[int] = None, input_size: Optional[int] = None,
                    in_channels: Optional[int] = None, num_classes: Optional[int] = None,
                    weights: str = DEFAULT_WEIGHTS, overwrite: bool = False,
                    progress: Optional[Callable[[str], None]] = None) -> Path:
    """Convert an official checkpoint of format ``fmt`` (``FORMATS``) into an igdit Lightning checkpoint at
    ``out``; returns ``out``.

    model / exits: default from the checkpoint's args or config, then its shapes, then the paper's (module
    docstring). vae: an encoder spec (``sd-vae-ft-ema``, ``vavae-f16d32:<checkpoint>``, ``diffusers:<folder>``),
    ``"default"`` for the format's, or None to import the weights alone (such a checkpoint cannot be decoded to
    images). latent_stats: a ``latents_stats.pt`` (mean, std per channel), scaled by latent_multiplier (default:
    the config's, else 1.0). resolution: the training image side (default: the args/config's, else 256).
    progress(stage) is called as each of the IMPORT_STAGES is done. Every check runs before anything is written.
    """
    import lightning

    from igdit.module import build_module  # Lightning: only when a checkpoint is written, not for --help

    progress = progress or (lambda stage: None)
    if fmt not in FORMATS:
        raise ConfigError("--from", fmt, "choose " + ", ".join(repr(f) for f in FORMATS))
    form = FORMATS[fmt]
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError("--out", str(out), "already exists; pass --overwrite to replace it")
    state, info = load_official(path, fmt, weights)
    progress(IMPORT_STAGES[0])
    name, backbone, facts = infer_backbone(state, info, form, model, exits, input_size=input_size,
                                           in_channels=in_channels, num_classes=num_classes)
    transport = {"path": facts["path"]} if facts.get("path") in ("linear", "cosine") else {}
    module = build_module({"backbone": backbone, "transport": transport})
    other = looks_like(state)
    hint = f" (its keys look like an {other} checkpoint)" if other != fmt else ""
    check_state_dict(state, module.backbone.state_dict(), name, module.backbone.exit_indices, hint)
    progress(IMPORT_STAGES[1])

    data_meta = None
    if vae is not None:
        spec = form.vae if vae == "default" else vae
        encoder, normalizer, fit = _decoder(form, spec, facts, module.latent_shape, resolution, latent_stats,
                                            latent_multiplier)
        latent_shape = [int(v) for v in module.latent_shape]  # plain ints: the file loads with weights_only
        side = latent_shape[1] * int(encoder.factor)
        data_meta = {"source": f"{fmt} checkpoint {Path(path).resolve()}", "encoder": encoder.describe(),
                     "normalizer": normalizer.to_dict(), "normalizer_fit": fit,
                     "latent_shape": latent_shape, "image_shape": [3, side, side], "resolution": side,
                     "num_classes": int(module.num_classes), "class_names": None}
    elif latent_stats is not None:
        raise ConfigError("--latent_stats", latent_stats, "normalises latents for a decoder; pass --vae too")
    progress(IMPORT_STAGES[2])
    module.backbone.load_state_dict(state, strict=True)

    steps = info["steps"] or 0
    checkpoint = {
        "state_dict": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "epoch": info["epoch"] or 0,
        "global_step": steps,
        "igdit_import": {"source": fmt, "path": str(path), "weights": info["weights"], "layout": info["layout"],
                         "args": info["args"], "model": name},
    }
    if data_meta is not None:
        checkpoint["igdit_data_meta"] = data_meta
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(out)  # never leave a half-written checkpoint at `out`
    progress(IMPORT_STAGES[3])
    return out
