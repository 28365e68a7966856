"""Turning generated latents into pictures a person can look at: one grid function for every sample grid."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) float in [-1, 1] -> (N, C, H, W) uint8 in [0, 255] (values outside are clipped)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_grid(blocks: list[torch.Tensor], upscale: int = 4, gap: int = 8, pad: int = 2) -> Image.Image:
    """Blocks of images side by side, each block a grid of R rows x K columns (torchvision's make_grid).

    blocks: each (R, K, C, H, W) uint8 with C in {1, 3}; all blocks have R rows and the same image size. Images
    are upscaled by ``upscale`` (nearest: 8x8 digits stay crisp), framed by ``pad`` white pixels, and the blocks
    are separated by a ``gap``-pixel white column.
    """
    pieces = []
    for b, block in enumerate(blocks):
        rows, columns = block.shape[:2]
        images = block.reshape(rows * columns, *block.shape[2:])
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        images = images.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)
        pieces.append(make_grid(images, nrow=columns, padding=pad, pad_value=255))
        if b < len(blocks) - 1:
            pieces.append(torch.full((3, pieces[-1].shape[1], gap), 255, dtype=torch.uint8))
    return Image.fromarray(torch.cat(pieces, dim=2).permute(1, 2, 0).numpy())


def save_png(image: Image.Image, path: str | Path, overwrite: bool = False) -> Path:
    """Save a PNG, refusing to replace an existing file (run outputs are never overwritten) unless ``overwrite`` (a
    run's own end-of-run grid, written again when the run is extended): then the new file replaces the old one whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        tmp = path.with_name(f".{path.name}.tmp")
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
        return path
    with open(path, "xb") as handle:
        image.save(handle, format="PNG")
    return path


def save_grid(images: torch.Tensor, path: str | Path, columns: int = 10, max_rows: int = 10) -> Path:
    """The first rows x ``columns`` images (N, C, H, W) uint8 as a PNG grid (small images upscaled to ~64 px)."""
    columns = min(columns, len(images))
    rows = min(max_rows, len(images) // columns)
    block = images[: rows * columns].reshape(rows, columns, *images.shape[1:])
    return save_png(image_grid([block], upscale=max(1, 64 // images.shape[-1])), path)
