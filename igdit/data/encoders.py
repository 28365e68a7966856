"""Latent encoders and the one latent normaliser.

An encoder maps images in [-1, 1] to latents and back: ``identity`` is pixel space; ``sd-vae-ft-ema`` and
``sd-vae-ft-mse`` are Stable Diffusion's KL-VAEs (4x32x32 latents for 256x256 images),
``diffusers:<folder or hub name>`` any other diffusers ``AutoencoderKL``, ``vavae-f16d32[:<checkpoint>]``
LightningDiT's VA-VAE (32x16x16) and ``ldm-vae:<checkpoint>`` any LDM-format KL autoencoder, both converted to a
diffusers ``AutoencoderKL`` on load (``igdit.data.ldm_vae``). The normaliser maps encoder
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

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, H, W) images in [-1, 1] -> the posterior's (mean, std), each (N, c, h, w) (stochastic encoders)."""
        raise ConfigError("latent", "posterior", f"the {self.name} encoder has no posterior to store; "
                                                 "posterior latents need a VAE encoder")

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


LATENT_MODES = ("sample", "mean", "posterior")
DIFFUSERS_PREFIX = "diffusers:"
# Named VAEs: encoder name -> Hugging Face hub id (read from the local HF cache or --vae_path, never downloaded).
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
    hint = (f"download it once with `hf download {hub_id}` (or copy the folder) and set HF_HOME, "
            "or name a local folder of its weights (diffusers:<folder>; `igdit data build` also takes --vae_path "
            "<folder>)") if hub_id else "pass a folder holding config.json and the weights"
    raise ConfigError("encoder", name, "no loadable AutoencoderKL weights; looked in " + "; then ".join(tried)
                      + f"; {hint}")


class DiffusersVAE(LatentEncoder):
    """A diffusers ``AutoencoderKL`` (SD-VAE and other KL-VAEs): (N, 3, H, W) in [-1, 1] <-> (N, c, H/f, W/f).

    name: ``sd-vae-ft-ema`` / ``sd-vae-ft-mse`` (hub ids in ``HUB_VAES``) or ``diffusers:<folder or hub id>``.
    path: a local folder with the weights (``save_pretrained`` layout), tried before the Hugging Face cache.
    latent: ``sample`` (default) stores one posterior sample z = mean + std * eps, eps seeded per image
        (LightningDiT's extract_features.py stores such a sample; fast-DiT too), reproducible and identical in a
        resumed build; ``mean`` stores the posterior mean; ``posterior`` stores the posterior's mean and std so
        that training draws a fresh latent each time it reads the sample (SiT+IG's train.py, from edm2's
        preprocessing); ``encode`` then returns a seeded draw (the normaliser's statistics are those of draws).
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
        vae, loaded_from = _load_autoencoder(name, folder, hub_id)
        self.path, self.hub_id = folder, hub_id
        self._attach(name, vae, loaded_from, latent, device)

    def _attach(self, name: str, vae, loaded_from: str, latent: str, device: Optional[str]) -> None:
        """Hold a loaded AutoencoderKL: its latent channels and downsampling factor come from its config."""
        self.name, self.latent = name, latent
        self.vae, self.loaded_from = vae, loaded_from
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
    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) in [-1, 1] -> (mean, std) of the diagonal Gaussian posterior, each (N, c, H/f, W/f)."""
        dist = self._on(self.device).encode(images.to(self.device, torch.float32)).latent_dist
        return dist.mean, dist.std

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
            "latent_rule": {"sample": "z = mean + std * eps, eps ~ N(0, I) seeded per image",
                            "mean": "z = posterior mean",
                            "posterior": "mean and std stored; z = mean + std * eps drawn at every read"}[self.latent],
            "downsampling": self.factor,
            "latent_channels": self.channels,
            "scaling_factor": float(config.scaling_factor),
            "shift_factor": config.shift_factor,
            "block_out_channels": list(config.block_out_channels),
            "diffusers_version": diffusers.__version__,
        }


# VA-VAE f16d32 (LightningDiT's tokenizer): its LDM checkpoint and latent statistics on the Hugging Face hub,
# read from the local cache only (or a path), never downloaded.
VAVAE_HUB = {"repo": "hustvl/vavae-imagenet256-f16d32-dinov2", "weights": "vavae-imagenet256-f16d32-dinov2.pt",
             "stats": "latents_stats.pt"}
_LDM_LOADED: dict[str, tuple[object, dict, list]] = {}  # resolved path -> (AutoencoderKL, config, left-out keys)


class LDMVAE(DiffusersVAE):
    """An LDM-format KL autoencoder checkpoint run as a diffusers ``AutoencoderKL`` (``igdit.data.ldm_vae``).

    name ``ldm-vae``; path: the LDM checkpoint (``.pt``/``.ckpt`` with a ``state_dict``, a bare state dict or
    ``.safetensors``), or a folder written by ``AutoencoderKL.save_pretrained`` of a converted one.
    Its architecture (widths, levels, attention placement, latent channels) is read off the checkpoint.
    """

    name = "ldm-vae"
    expected: Optional[tuple[int, int]] = None  # (latent channels, downsampling) the name promises

    def __init__(self, path: Optional[str] = None, latent: str = "sample", device: Optional[str] = None):
        check_choice("latent", latent, LATENT_MODES)
        label = self.name + (f":{path}" if path else "")
        where = self._weights(path)
        self.left_out: list[str] = []
        if Path(where).is_dir():
            vae, loaded_from = _load_autoencoder(self.name, where, None)
        else:
            from igdit.data.ldm_vae import ldm_autoencoder

            if where not in _LDM_LOADED:
                _LDM_LOADED[where] = ldm_autoencoder(where, field="encoder")
            vae, _, self.left_out = _LDM_LOADED[where]
            loaded_from = where
        self.path, self.hub_id = where, None
        self._attach(self.name, vae, loaded_from, latent, device)
        if self.expected is not None and (self.channels, self.factor) != self.expected:
            raise ConfigError("encoder", label, f"holds a VAE with {self.channels} latent channels and downsampling "
                              f"{self.factor}; {self.name} has {self.expected[0]} and {self.expected[1]} "
                              "(ldm-vae:<file> takes any LDM autoencoder)")

    def _weights(self, path: Optional[str]) -> str:
        """The weights' absolute path; a one-line ConfigError naming where it looked when there are none."""
        if path is None:
            raise ConfigError("encoder", self.name, "needs its weights: pass ldm-vae:<checkpoint or folder>")
        where = Path(path).expanduser().resolve()
        if not where.exists():
            raise ConfigError("encoder", f"{self.name}:{path}", f"no such file or folder ({where})")
        return str(where)

    def describe(self) -> dict:
        return super().describe() | {"format": "ldm", "converted_with": "diffusers convert_ldm_vae_checkpoint "
                                     "(+ in-level attention renamed by its update_vae_attentions_ldm_to_diffusers)",
                                     "left_out_keys": len(self.left_out)}


class VAVAE(LDMVAE):
    """VA-VAE f16d32 (LightningDiT's tokenizer, 32 x 16 x 16 latents at 256 px), from its LDM checkpoint.

    path: the checkpoint (default: ``vavae-imagenet256-f16d32-dinov2.pt`` of ``hustvl/vavae-imagenet256-
    f16d32-dinov2`` in the local Hugging Face cache; nothing is downloaded). Its own normaliser is the
    ``latents_stats.pt`` of that hub repository (per-channel mean and std, LightningDiT's ``latent_norm`` with
    ``latent_multiplier`` 1.0); pass another statistics file with ``load_latent_stats``.
    """

    name = "vavae-f16d32"
    expected = (32, 16)

    def _weights(self, path: Optional[str]) -> str:
        if path is not None:
            return super()._weights(path)
        from igdit.data.ldm_vae import hub_file

        found = hub_file(VAVAE_HUB["repo"], VAVAE_HUB["weights"])
        if found is None:
            raise ConfigError("encoder", self.name, f"no weights: looked for {VAVAE_HUB['weights']} of "
                              f"{VAVAE_HUB['repo']} in the Hugging Face cache {hf_cache_dir()}; pass "
                              f"{self.name}:<checkpoint> (download it once with `hf download "
                              f"{VAVAE_HUB['repo']} {VAVAE_HUB['weights']}`)")
        return str(Path(found).resolve())

    def normalizer(self, channels: int) -> "LatentNormalizer":
        """VA-VAE's published normaliser: its hub repository's latents_stats.pt (from the local cache)."""
        from igdit.data.ldm_vae import hub_file

        found = hub_file(VAVAE_HUB["repo"], VAVAE_HUB["stats"])
        if found is None:
            raise ConfigError("normalizer", "encoder", f"VA-VAE's latents are normalised with per-channel statistics: "
                              f"looked for {VAVAE_HUB['stats']} of {VAVAE_HUB['repo']} in the Hugging Face cache "
                              f"{hf_cache_dir()}; download it, or use --normalizer channel-stats (the official "
                              "recipe's own: mean and std of 10,000 training latents)")
        return load_latent_stats(found, field="normalizer")


def load_latent_stats(path: str, multiplier: float = 1.0, field: str = "--latent_stats") -> "LatentNormalizer":
    """LightningDiT's ``latents_stats.pt`` ({"mean", "std"}, each (1, c, 1, 1) or (c,)) as the normaliser
    x = (z - mean) / std * multiplier (``ImgLatentDataset``; inference decodes z = x std / multiplier + mean)."""
    import pickle

    where = Path(path).expanduser()
    if not where.is_file():
        raise ConfigError(field, str(path), f"no such file ({where.resolve()})")
    try:
        stats = torch.load(where, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ConfigError(field, str(path), f"could not be read with torch.load(weights_only=True): {first}") from None
    if not isinstance(stats, dict) or not all(isinstance(stats.get(k), torch.Tensor) for k in ("mean", "std")):
        raise ConfigError(field, str(path), "expected a dict with 'mean' and 'std' tensors (LightningDiT's "
                                            "latents_stats.pt)")
    mean, std = stats["mean"].double().flatten(), stats["std"].double().flatten()
    if mean.shape != std.shape:
        raise ConfigError(field, str(path), f"mean has {mean.numel()} values and std {std.numel()}")
    if not torch.all(std > 0):
        raise ConfigError(field, str(path), "std must be positive in every channel")
    return LatentNormalizer(mean.tolist(), (float(multiplier) / std).tolist())


ENCODERS: dict[str, Callable[..., LatentEncoder]] = {
    "identity": IdentityEncoder,
    **{name: partial(DiffusersVAE, name) for name in HUB_VAES},
    VAVAE.name: VAVAE,
    LDMVAE.name: LDMVAE,
}
PATH_ENCODERS = (VAVAE.name, LDMVAE.name)  # written <name>:<path> as well as with a separate path option


def build_encoder(spec, **options) -> LatentEncoder:
    """The encoder named by ``spec``: a name (``identity``, ``sd-vae-ft-ema``, ``diffusers:<folder or hub id>``,
    ``vavae-f16d32[:<checkpoint>]``, ``ldm-vae:<checkpoint>``) or a meta.json description
    (``encoder.describe()``), which rebuilds the same encoder for decoding.

    options (VAEs only): path (local weights folder), latent (``sample`` or ``mean``), device.
    ConfigError on field ``encoder`` for an unknown name or weights that cannot be loaded.
    """
    if isinstance(spec, dict):
        options = {k: spec[k] for k in ("path", "latent") if spec.get(k) is not None} | options
        spec = spec.get("name")
    options = {k: v for k, v in options.items() if v is not None}
    if isinstance(spec, str) and spec.startswith(DIFFUSERS_PREFIX) and len(spec) > len(DIFFUSERS_PREFIX):
        return DiffusersVAE(spec, **options)
    if isinstance(spec, str) and ":" in spec and spec.split(":", 1)[0] in PATH_ENCODERS:
        spec, path = spec.split(":", 1)
        if options.get("path") not in (None, path):
            raise ConfigError("vae_path", options["path"], f"contradicts the path in {spec}:{path}; give one of them")
        options["path"] = path
    allowed = [n for n in ENCODERS if n not in PATH_ENCODERS] + [DIFFUSERS_PREFIX + "<folder or hub id>",
                                                                 f"{VAVAE.name}[:<checkpoint>]", f"{LDMVAE.name}:<checkpoint>"]
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
