"""Latent encoders and the one latent normaliser.

An encoder maps images in [-1, 1] to latents and back (``identity`` is pixel space; an SD-VAE encoder
slots into ``ENCODERS`` later). The normaliser maps encoder latents to the network's scale and back.
Its statistics are stored in the shards' meta.json and travel into checkpoints, and the same object
is used when writing shards and when decoding samples, so encode and decode cannot disagree on the
scaling (the classic 0.18215-versus-per-channel-statistics bug).
"""
from __future__ import annotations

import math
from typing import Sequence

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

    encode: (N, C, H, W) float images in [-1, 1] -> (N, c, h, w) latents (not yet normalised).
    decode: (N, c, h, w) latents -> (N, C, H, W) images in [-1, 1].
    """

    name: str = ""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        """(C, H, W) of an image -> (c, h, w) of its latent."""
        raise NotImplementedError

    def fit_normalizer(self, latents: torch.Tensor) -> "LatentNormalizer":
        """The normaliser to store with shards of these (N, c, h, w) training latents.

        Default: shift 0, scale 1 (latents already at unit scale). A VAE encoder overrides this with its
        published constant or per-channel statistics of ``latents``.
        """
        return LatentNormalizer.identity(latents.shape[1])

    def describe(self) -> dict:
        """JSON-able description for meta.json; ``name`` is what ``build_encoder`` rebuilds it from."""
        return {"name": self.name}


class IdentityEncoder(LatentEncoder):
    """Pixel space: the latent is the image itself, (N, C, H, W) in [-1, 1]."""

    name = "identity"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        c, h, w = image_shape
        return (int(c), int(h), int(w))

    def describe(self) -> dict:
        return {"name": self.name, "space": "pixel", "downsampling": 1}


ENCODERS: dict[str, type[LatentEncoder]] = {"identity": IdentityEncoder}


def build_encoder(name: str) -> LatentEncoder:
    """The registered encoder called ``name`` (ConfigError on field ``encoder`` otherwise)."""
    check_choice("encoder", name, ENCODERS)
    return ENCODERS[name]()


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
