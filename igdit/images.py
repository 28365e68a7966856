"""Turning generated latents into pictures a person can look at."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) float in [-1, 1] -> (N, C, H, W) uint8 in [0, 255] (values outside are clipped)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_grid(blocks: list[torch.Tensor], upscale: int = 4, gap: int = 8, pad: int = 2) -> Image.Image:
    """Lay out blocks of images side by side.

    blocks: each (R, K, C, H, W) uint8 with C in {1, 3}; all blocks have R rows. Row r of every block
    is placed on one line, blocks left to right with a `gap`-pixel white column between them.
    Each image is upscaled by `upscale` with nearest-neighbour (so 8x8 digits stay crisp).
    """
    rows = []
    for r in range(blocks[0].shape[0]):
        pieces = []
        for b, block in enumerate(blocks):
            for image in block[r]:
                image = image.expand(3, -1, -1) if image.shape[0] == 1 else image
                image = image.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)
                pieces.append(torch.nn.functional.pad(image, (pad, pad, pad, pad), value=255))
            if b < len(blocks) - 1:
                pieces.append(torch.full((3, pieces[-1].shape[1], gap), 255, dtype=torch.uint8))
        rows.append(torch.cat(pieces, dim=2))
    grid = torch.cat(rows, dim=1)
    return Image.fromarray(grid.permute(1, 2, 0).numpy().astype(np.uint8))


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Save a PNG, refusing to replace an existing file (run outputs are never overwritten)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as handle:
        image.save(handle, format="PNG")
    return path
