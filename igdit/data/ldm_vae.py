"""LDM-format KL autoencoders (VA-VAE f16d32 and its relatives) as diffusers ``AutoencoderKL``s.

VA-VAE has "exactly the same architecture as the LDM VAE" (LightningDiT/tokenizer/vavae.py): an LDM
``Encoder``/``Decoder`` with ch 128, ch_mult (1, 1, 2, 2, 4) (downsampling 16), two residual blocks per level,
32 latent channels (double_z), GroupNorm(32, eps 1e-6) and single-head attention at resolution 16 — in the
mid blocks *and* inside the lowest-resolution level of the encoder (after each of its residual blocks) and of
the decoder. diffusers expresses that level with ``AttnDownEncoderBlock2D`` / ``AttnUpDecoderBlock2D``, so
the whole network is a stock ``AutoencoderKL``; no autoencoder is written here.

The weights are converted with diffusers' own ``convert_ldm_vae_checkpoint`` (the single-file loader's
LDM -> diffusers mapping). It maps every key of an SD-style VAE, whose levels have no attention; the keys of
the in-level attention blocks (``encoder.down.<i>.attn.<j>.*``, ``decoder.up.<i>.attn.<j>.*``) it passes through
under their LDM names. Those are renamed with diffusers' own attention rule
(``update_vae_attentions_ldm_to_diffusers``: norm -> group_norm, q/k/v -> to_q/to_k/to_v, proj_out -> to_out.0,
1x1 convs -> linear weights), in the block diffusers numbers them (decoder levels are reversed). Every
converted key and shape is then checked against the model before loading (``strict``).

A checkpoint's other entries (VA-VAE's DINOv2 alignment projection, the LPIPS/discriminator loss, a
``foundation_model``) are not part of the autoencoder; they are counted and left out, as the official
``init_from_ckpt`` (``strict=False``) leaves them.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Optional

import torch

from igdit.config import ConfigError

LDM_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
LDM_PREFIXES = ("first_stage_model.", "vae.", "module.")
LDM_NORM_GROUPS = 32  # LDM's Normalize(): GroupNorm(32, eps 1e-6), fixed in the architecture


def read_ldm_checkpoint(path: str | Path, field: str = "encoder") -> dict[str, torch.Tensor]:
    """An LDM autoencoder checkpoint (``.pt``/``.ckpt`` with a ``state_dict``, a bare state dict, or
    ``.safetensors``) as a state dict of the autoencoder's own keys (prefixes such as ``first_stage_model.``
    removed). Read with ``torch.load(weights_only=True)``: no pickled code runs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(field, str(path), "no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise ConfigError(field, str(path), "could not be read with torch.load(weights_only=True) "
                              f"({first}); if you trust the file, save its state_dict alone with torch.save and "
                              "pass that") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(field, str(path), "holds no state dict (expected an LDM autoencoder checkpoint)")
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    for prefix in LDM_PREFIXES:
        if any(k.startswith(prefix + "encoder.") for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not any(k.startswith("encoder.") for k in state) or not any(k.startswith("decoder.") for k in state):
        raise ConfigError(field, str(path), "is not an LDM autoencoder checkpoint (no encoder.* and decoder.* "
                                            "weights)")
    return state


def _levels(state: dict, part: str, kind: str) -> list[int]:
    pattern = re.compile(rf"^{part}\.{kind}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})


def ldm_vae_config(state: dict[str, torch.Tensor], field: str = "encoder") -> dict:
    """The diffusers ``AutoencoderKL`` config of an LDM autoencoder, read off its keys and shapes.

    ch = conv_in width, ch_mult from each level's width, num_res_blocks from the first level, z_channels from
    the decoder's conv_in, attention levels from ``attn`` keys; GroupNorm groups are LDM's fixed 32.
    """
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise ConfigError(field, key, "missing in the LDM autoencoder checkpoint")
        return tuple(state[key].shape)

    levels = _levels(state, "encoder", "down")
    if not levels or levels != list(range(len(levels))) or _levels(state, "decoder", "up") != levels:
        raise ConfigError(field, levels, "encoder.down.<i> and decoder.up.<i> levels are not 0..n-1 in both halves")
    ch = shape("encoder.conv_in.weight")[0]
    widths = [shape(f"encoder.down.{i}.block.0.conv2.weight")[0] for i in levels]
    blocks = len({k.split(".")[4] for k in state if k.startswith("encoder.down.0.block.")})
    z_channels = shape("decoder.conv_in.weight")[1]
    moments = shape("quant_conv.weight")[0]
    if shape("encoder.conv_out.weight")[0] != 2 * z_channels or moments != 2 * z_channels:
        raise ConfigError(field, moments, f"quant_conv gives {moments} moments for {z_channels} latent channels; "
                                          "diffusers' AutoencoderKL needs embed_dim = z_channels and double_z")
    encoder_attn = {i for i in levels if any(k.startswith(f"encoder.down.{i}.attn.") for k in state)}
    decoder_attn = {i for i in levels if any(k.startswith(f"decoder.up.{i}.attn.") for k in state)}
    if any(w % LDM_NORM_GROUPS for w in [ch, *widths]):
        raise ConfigError(field, widths, f"LDM widths are multiples of its {LDM_NORM_GROUPS} GroupNorm groups")
    return {
        "in_channels": shape("encoder.conv_in.weight")[1],
        "out_channels": shape("decoder.conv_out.weight")[0],
        "down_block_types": ["AttnDownEncoderBlock2D" if i in encoder_attn else "DownEncoderBlock2D" for i in levels],
        # diffusers numbers decoder blocks from the lowest resolution up: LDM's up.<n-1> first
        "up_block_types": ["AttnUpDecoderBlock2D" if i in decoder_attn else "UpDecoderBlock2D"
                           for i in reversed(levels)],
        "block_out_channels": widths,
        "layers_per_block": blocks,
        "act_fn": "silu",
        "latent_channels": z_channels,
        "norm_num_groups": LDM_NORM_GROUPS,
        "sample_size": 256,
        "scaling_factor": 1.0,
        "mid_block_add_attention": any(k.startswith("encoder.mid.attn_1.") for k in state),
    }


def convert_ldm_vae(state: dict[str, torch.Tensor], config: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(diffusers state dict, LDM keys left out as not part of the autoencoder) for ``ldm_vae_config(state)``."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, update_vae_attentions_ldm_to_diffusers

    vae_keys = {k: v for k, v in state.items() if k.startswith(LDM_PARTS)}
    left_out = sorted(set(state) - set(vae_keys))
    converted = convert_ldm_vae_checkpoint(vae_keys, config)
    # diffusers' converter passes the in-level attention keys through under their LDM names: rename them here
    in_level = re.compile(r"^(encoder\.down|decoder\.up)\.(\d+)\.attn\.(\d+)\.")
    converted = {k: v for k, v in converted.items() if not in_level.match(k)}
    levels = len(config["down_block_types"])
    for key in vae_keys:
        match = in_level.match(key)
        if match is None:
            continue
        part, level, index = match.group(1), int(match.group(2)), int(match.group(3))
        new = (f"down_blocks.{level}" if part == "encoder.down" else f"up_blocks.{levels - 1 - level}") \
            + f".attentions.{index}"
        old = f"{part.split('.')[1]}.{level}.attn.{index}"
        update_vae_attentions_ldm_to_diffusers([key], converted, vae_keys, mapping={"old": old, "new": new})
    return converted, left_out


def ldm_autoencoder(path: str | Path, field: str = "encoder"):
    """A diffusers ``AutoencoderKL`` (eval mode, no gradients) with the weights of the LDM checkpoint at ``path``.

    Returns (vae, config, left_out keys). Every key and shape is checked before anything is loaded: a missing or
    unexpected key, or one whose shape differs, is a one-line ConfigError naming it.
    """
    from diffusers import AutoencoderKL

    state = read_ldm_checkpoint(path, field)
    config = ldm_vae_config(state, field)
    converted, left_out = convert_ldm_vae(state, config)
    with torch.device("meta"):
        expected = AutoencoderKL(**config).state_dict()
    for key, tensor in expected.items():
        if key not in converted:
            raise ConfigError(field, str(path), f"converted weights lack {key} (LDM layout not understood)")
        if tuple(converted[key].shape) != tuple(tensor.shape):
            raise ConfigError(field, str(path), f"{key} has shape {tuple(converted[key].shape)} after conversion, "
                                                f"the autoencoder expects {tuple(tensor.shape)}")
    unexpected = sorted(set(converted) - set(expected))
    if unexpected:
        raise ConfigError(field, str(path), f"{unexpected[0]} is not a weight of the converted autoencoder")
    vae = AutoencoderKL(**config)
    vae.load_state_dict(converted, strict=True)
    return vae.eval().requires_grad_(False), config, left_out


def hub_file(repo_id: str, filename: str) -> Optional[str]:
    """The path of ``repo_id``/``filename`` in the local Hugging Face cache, or None (nothing is downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return found if isinstance(found, str) else None
