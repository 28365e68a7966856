"""Latent encoders and the one latent normaliser.

An encoder maps images in [-1, 1] to latents and back: ``identity`` is pixel space; ``sd-vae-ft-ema`` and
``sd-vae-ft-mse`` are Stable Diffusion's KL-VAEs (4x32x32 latents for 256x256 images) and
``diffusers:<folder or hub name>`` any other diffusers ``AutoencoderKL``. The normaliser maps encoder
latents to the network's scale and back. Its statistics are stored in the shards' meta.json and travel
into checkpoints, and the same object is used when writing shards and when decoding samples, so encode
and decode cannot disagree on the scaling (the classic 0.18215-versus-per-channel-statistics bug).
``describe()`` goes into meta.json as ``encoder`` and is all ``build_encoder`` needs to rebuild the
encoder for decoding.
"""
from __future__ import annotations

import functools
import json
import math
import warnings
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from igdit.config import ConfigError, check_choice
from igdit.images import to_uint8


def images_to_unit(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) uint8 in [0, 255] -> float32 in [-1, 1] (0 -> -1, 255 -> 1)."""
    return images.float() / 127.5 - 1.0


def unit_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) float in [-1, 1] -> uint8 in [0, 255]; the exact inverse of ``images_to_unit`` on uint8 input."""
    return to_uint8(images)


class LatentEncoder:
    """Base class of image <-> latent encoders.

    encode: (N, C, H, W) float images in [-1, 1] -> (N, c, h, w) latents (not yet normalised); ``seeds``
        (one int per image) seed the posterior sample of a stochastic encoder, so a latent does not depend
        on the batch it was encoded in.
    decode: (N, c, h, w) latents -> (N, C, H, W) images in [-1, 1], on the latents' device.
    """

    name: str = ""

    def encode(self, images: torch.Tensor, seeds: Optional[Sequence[int]] = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        """(C, H, W) of an image -> (c, h, w) of its latent."""
        raise NotImplementedError

    def normalizer(self, channels: int) -> "LatentNormalizer":
        """The encoder's own normaliser for ``channels``-channel latents (a VAE's published scaling).

        Default: shift 0, scale 1 (latents already at unit scale). Per-channel statistics measured on the
        training latents are the other choice (``LatentNormalizer.from_latents``; `--normalizer channel-stats`).
        """
        return LatentNormalizer.identity(channels)

    def describe(self) -> dict:
        """JSON-able description for meta.json: ``build_encoder(description)`` rebuilds this encoder."""
        return {"name": self.name}


class IdentityEncoder(LatentEncoder):
    """Pixel space: the latent is the image itself, (N, C, H, W) in [-1, 1]."""

    name = "identity"

    def encode(self, images: torch.Tensor, seeds: Optional[Sequence[int]] = None) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        c, h, w = image_shape
        return (int(c), int(h), int(w))

    def describe(self) -> dict:
        return {"name": self.name, "space": "pixel", "downsampling": 1}


LATENT_MODES = ("sample", "mean")
DIFFUSERS_PREFIX = "diffusers:"
# Named VAEs: encoder name -> Hugging Face hub id (read from the local HF cache or --vae-path, never downloaded).
HUB_VAES = {"sd-vae-ft-ema": "stabilityai/sd-vae-ft-ema", "sd-vae-ft-mse": "stabilityai/sd-vae-ft-mse"}
_LOADED: dict[tuple[str, ...], tuple[object, str]] = {}  # (name, path) -> (AutoencoderKL, where it came from)


def hf_cache_dir() -> str:
    """The Hugging Face hub cache diffusers reads (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _load_autoencoder(name: str, folder: Optional[str], hub_id: Optional[str]):
    """AutoencoderKL from a local folder, else from the HF cache (local_files_only: nothing is downloaded).

    Returns (vae, where it was loaded from). Raises a one-line ConfigError on field ``encoder`` naming every
    place that was looked in.
    """
    key = (name, folder or "")
    if key in _LOADED:
        return _LOADED[key]
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ConfigError("encoder", name, "needs diffusers: pip install 'igdit[vae]'") from None
    tried = []
    for where in [c for c in (folder, hub_id) if c]:
        label = f"the folder {where}" if where == folder else f"the Hugging Face cache {hf_cache_dir()} (for {where})"
        if where == folder and not Path(folder).is_dir():
            tried.append(f"{label} (no such folder)")
            continue
        try:
            with warnings.catch_warnings():  # huggingface_hub's deprecation notes about arguments diffusers passes
                warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
                vae = AutoencoderKL.from_pretrained(where, local_files_only=True, low_cpu_mem_usage=False)
        except Exception as err:  # diffusers raises OSError, EnvironmentError, ValueError... for missing files
            tried.append(f"{label} ({type(err).__name__}: {' '.join(str(err).split())[:160]})")
            continue
        _LOADED[key] = (vae.eval().requires_grad_(False), str(where))
        return _LOADED[key]
    hint = (f"download it once with `huggingface-cli download {hub_id}` (or copy the folder) and set HF_HOME, "
            "or pass --vae-path <folder>") if hub_id else "pass a folder holding config.json and the weights"
    raise ConfigError("encoder", name, "no loadable AutoencoderKL weights; looked in " + "; then ".join(tried)
                      + f"; {hint}")


class DiffusersVAE(LatentEncoder):
    """A diffusers ``AutoencoderKL`` (SD-VAE and other KL-VAEs): (N, 3, H, W) in [-1, 1] <-> (N, c, H/f, W/f).

    name: ``sd-vae-ft-ema`` / ``sd-vae-ft-mse`` (hub ids in ``HUB_VAES``) or ``diffusers:<folder or hub id>``.
    path: a local folder with the weights (``save_pretrained`` layout), tried before the Hugging Face cache.
    latent: ``sample`` (default) stores one posterior sample z = mean + std * eps, eps seeded per image —
        the latents SiT's training saw (its train.py encodes with ``latent_dist.sample()``; fast-DiT stores
        such a sample), reproducible and identical in a resumed build; ``mean`` stores the posterior mean.
    device: where encode runs (decode runs on the latents' device).
    """

    def __init__(self, name: str, path: Optional[str] = None, latent: str = "sample",
                 device: Optional[str] = None):
        check_choice("latent", latent, LATENT_MODES)
        folder, hub_id = path, HUB_VAES.get(name)
        if name.startswith(DIFFUSERS_PREFIX):
            target = name[len(DIFFUSERS_PREFIX):]
            if Path(target).expanduser().is_dir() or target.startswith((".", "/", "~")):
                folder = str(Path(target).expanduser().resolve())
                name = DIFFUSERS_PREFIX + folder  # an absolute path: meta.json rebuilds it from any folder
            else:
                hub_id = target
        self.name, self.latent = name, latent
        self.vae, self.loaded_from = _load_autoencoder(name, folder, hub_id)
        self.path, self.hub_id = folder, hub_id
        self.device = torch.device(device or "cpu")
        config = self.vae.config
        self.factor = 2 ** (len(config.block_out_channels) - 1)
        self.channels = int(config.latent_channels)

    def _on(self, device: torch.device):
        if next(self.vae.parameters()).device != device:
            self.vae.to(device)
        return self.vae

    @torch.no_grad()
    def encode(self, images: torch.Tensor, seeds: Optional[Sequence[int]] = None) -> torch.Tensor:
        vae = self._on(self.device)
        dist = vae.encode(images.to(self.device, torch.float32)).latent_dist
        if self.latent == "mean":
            return dist.mean
        if seeds is None:
            eps = torch.randn(dist.mean.shape)
        else:  # one generator per image: the draw depends on the image's seed only, not on the batch
            if len(seeds) != images.shape[0]:
                raise ValueError(f"got {len(seeds)} seeds for {images.shape[0]} images")
            eps = torch.stack([torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(int(s)))
                               for s in seeds])
        return dist.mean + dist.std * eps.to(dist.mean.device, dist.mean.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int = 32) -> torch.Tensor:
        vae = self._on(latents.device)
        images = [vae.decode(chunk.float()).sample for chunk in latents.split(batch)]
        return torch.cat(images).clamp(-1, 1)

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        c, h, w = (int(v) for v in image_shape)
        if c != self.vae.config.in_channels:
            raise ConfigError("encoder", self.name, f"takes {self.vae.config.in_channels}-channel images; the "
                              f"source has {c} channels")
        if h % self.factor or w % self.factor:
            raise ConfigError("resolution", h, f"must be a multiple of the VAE's downsampling factor {self.factor}")
        return (self.channels, h // self.factor, w // self.factor)

    def normalizer(self, channels: int) -> "LatentNormalizer":
        """diffusers' own convention: x = (z - shift_factor) * scaling_factor (0 and 0.18215 for SD-VAE), or
        x = (z - latents_mean) * scaling_factor / latents_std where the config has per-channel statistics."""
        config = self.vae.config
        scale = float(config.scaling_factor)
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            return LatentNormalizer(config.latents_mean, [scale / float(s) for s in config.latents_std])
        return LatentNormalizer([float(config.shift_factor or 0.0)] * channels, [scale] * channels)

    def describe(self) -> dict:
        import diffusers

        config = self.vae.config
        return {
            "name": self.name,
            "class": "diffusers.AutoencoderKL",
            "hub_id": self.hub_id,
            "path": self.path,
            "loaded_from": self.loaded_from,
            "latent": self.latent,
            "latent_rule": "z = mean + std * eps, eps ~ N(0, I) seeded per image" if self.latent == "sample"
                           else "z = posterior mean",
            "downsampling": self.factor,
            "latent_channels": self.channels,
            "scaling_factor": float(config.scaling_factor),
            "shift_factor": config.shift_factor,
            "block_out_channels": list(config.block_out_channels),
            "diffusers_version": diffusers.__version__,
        }


ENCODERS: dict[str, Callable[..., LatentEncoder]] = {
    "identity": IdentityEncoder,
    **{name: partial(DiffusersVAE, name) for name in HUB_VAES},
}
ENCODER_OPTIONS = ("path", "latent", "device")  # what a description or the command line may pass to a VAE


def build_encoder(spec, **options) -> LatentEncoder:
    """The encoder named by ``spec``: a name (``identity``, ``sd-vae-ft-ema``, ``diffusers:<folder or hub id>``)
    or a meta.json description (``encoder.describe()``), which rebuilds the same encoder for decoding.

    options (VAEs only): path (local weights folder), latent (``sample`` or ``mean``), device.
    ConfigError on field ``encoder`` for an unknown name or weights that cannot be loaded.
    """
    if isinstance(spec, dict):
        options = {k: spec[k] for k in ("path", "latent") if spec.get(k) is not None} | options
        spec = spec.get("name")
    options = {k: v for k, v in options.items() if v is not None}
    if isinstance(spec, str) and spec.startswith(DIFFUSERS_PREFIX) and len(spec) > len(DIFFUSERS_PREFIX):
        return DiffusersVAE(spec, **options)
    allowed = list(ENCODERS) + [DIFFUSERS_PREFIX + "<folder or hub id>"]
    if spec not in ENCODERS:
        raise ConfigError("encoder", spec, "choose one of " + ", ".join(repr(c) for c in allowed))
    if spec == "identity":
        options.pop("device", None)  # nothing to place on a device
    if spec == "identity" and options:
        field = next(iter(options))
        raise ConfigError("vae_path" if field == "path" else field, options[field],
                          "only VAE encoders take it; the identity encoder has no weights or posterior")
    return ENCODERS[spec](**options)


class LatentNormalizer:
    """Per-channel affine map between encoder latents z and network inputs x.

    normalize:   x = (z - shift) * scale
    denormalize: z = x / scale + shift
    shift, scale: one float per latent channel; tensors (N, c, h, w) with c = len(shift).
    """

    def __init__(self, shift: Sequence[float], scale: Sequence[float]):
        shift, scale = [float(v) for v in shift], [float(v) for v in scale]
        if len(shift) != len(scale) or not shift:
            raise ConfigError("normalizer", {"shift": shift, "scale": scale},
                              "shift and scale need one value per latent channel each")
        if not all(math.isfinite(v) for v in shift):
            raise ConfigError("normalizer.shift", shift, "expected finite numbers")
        if not all(math.isfinite(v) and v != 0 for v in scale):
            raise ConfigError("normalizer.scale", scale, "expected finite non-zero numbers")
        self.shift, self.scale = shift, scale

    @classmethod
    def identity(cls, channels: int) -> "LatentNormalizer":
        return cls([0.0] * channels, [1.0] * channels)

    @classmethod
    def from_latents(cls, z: torch.Tensor) -> "LatentNormalizer":
        """Per-channel statistics of (N, c, h, w) latents: shift = mean, scale = 1 / std (float64 sums), so the
        normalised latents have zero mean and unit variance per channel."""
        z = z.double().transpose(0, 1).reshape(z.shape[1], -1)
        mean, std = z.mean(dim=1), z.std(dim=1)
        if not torch.all(std > 0):
            raise ConfigError("normalizer", "channel-stats", "a latent channel is constant on the images used for "
                              "the statistics; use the encoder's own scaling instead")
        return cls(mean.tolist(), (1.0 / std).tolist())

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.ndim != 4 or z.shape[1] != len(self.shift):
            raise ValueError(f"expected (N, {len(self.shift)}, h, w) latents, got {tuple(z.shape)}")
        as_channels = dict(device=z.device, dtype=z.dtype)
        return (torch.tensor(self.shift, **as_channels).view(1, -1, 1, 1),
                torch.tensor(self.scale, **as_channels).view(1, -1, 1, 1))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """(N, c, h, w) encoder latents -> network scale."""
        shift, scale = self._stats(z)
        return (z - shift) * scale

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """(N, c, h, w) network-scale latents -> encoder latents."""
        shift, scale = self._stats(x)
        return x / scale + shift

    def to_dict(self) -> dict:
        return {"shift": list(self.shift), "scale": list(self.scale)}

    @classmethod
    def from_dict(cls, d: dict) -> "LatentNormalizer":
        return cls(d["shift"], d["scale"])

    def __eq__(self, other) -> bool:
        return isinstance(other, LatentNormalizer) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"LatentNormalizer(shift={self.shift}, scale={self.scale})"


def decode_latents(latents: torch.Tensor, meta: Optional[dict]) -> torch.Tensor:
    """(N, c, h, w) normalised latents -> (N, C, H, W) images in [-1, 1], with the shards' own normaliser
    and encoder (identity for pixel-space data, an SD-VAE for ImageNet latents), so encode and decode cannot
    disagree."""
    if meta is None:
        return latents
    normalizer = LatentNormalizer.from_dict(meta["normalizer"])
    return _decoder(json.dumps(meta["encoder"], sort_keys=True)).decode(normalizer.denormalize(latents))


@functools.lru_cache(maxsize=4)
def _decoder(description: str):
    """One encoder object per description (name, weights folder, latent mode): an SD-VAE is loaded once, not
    once per batch of samples."""
    return build_encoder(json.loads(description))
