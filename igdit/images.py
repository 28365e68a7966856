"""Turning generated latents into pictures a person can look at: one grid function for every sample grid."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) float in [-1, 1] -> (N, C, H, W) uint8 in [0, 255] (values outside are clipped)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_grid(blocks: list[torch.Tensor], upscale: int = 4, gap: int = 8, pad: int = 2,
               row_labels: Optional[list[str]] = None, block_labels: Optional[list[str]] = None) -> Image.Image:
    """Blocks of images side by side, each block a grid of R rows x K columns (torchvision's make_grid).

    blocks: each (R, K, C, H, W) uint8 with C in {1, 3}; all blocks have R rows and the same image size. Images
    are upscaled by ``upscale`` (nearest: 8x8 digits stay crisp), framed by ``pad`` white pixels, and the blocks
    are separated by a ``gap``-pixel white column. ``row_labels`` (R names, e.g. the classes) are written left of
    the rows and ``block_labels`` (one per block, e.g. the guidance setting) above the blocks.
    """
    from torchvision.utils import make_grid  # torchvision's import costs seconds: only where a grid is drawn

    pieces, spans, x = [], [], 0
    for b, block in enumerate(blocks):
        rows, columns = block.shape[:2]
        images = block.reshape(rows * columns, *block.shape[2:])
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        images = images.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)
        pieces.append(make_grid(images, nrow=columns, padding=pad, pad_value=255))
        spans.append((x, x + pieces[-1].shape[2]))
        x = spans[-1][1]
        if b < len(blocks) - 1:
            pieces.append(torch.full((3, pieces[-1].shape[1], gap), 255, dtype=torch.uint8))
            x += gap
    grid = Image.fromarray(torch.cat(pieces, dim=2).permute(1, 2, 0).numpy())
    if row_labels is None and block_labels is None:
        return grid
    cell = blocks[0].shape[-1] * upscale + pad
    return label_grid(grid, row_labels or [], block_labels or [], spans, cell, pad)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's own scalable font (needs FreeType)
    except (TypeError, OSError):
        return ImageFont.load_default()


def label_grid(grid: Image.Image, row_labels: list[str], block_labels: list[str], spans: list[tuple[int, int]],
               cell: int, pad: int) -> Image.Image:
    """``grid`` with a band on the left holding one label per row of ``cell`` pixels (after ``pad``) and a band
    on top holding one label centred over each block's (x0, x1) ``span``; labels too long are shortened."""
    from PIL import ImageDraw

    font = _font(max(10, min(18, cell // 2)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    def fit(text: str, width: int) -> str:
        while text and size(text)[0] > width:
            text = text[:-2] + "…" if len(text) > 1 else ""
        return text

    left = max([size(t)[0] for t in row_labels], default=0) + 8 if row_labels else 0
    top = max([size(t)[1] for t in block_labels], default=0) + 10 if block_labels else 0
    out = Image.new("RGB", (grid.width + left, grid.height + top), "white")
    out.paste(grid, (left, top))
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(row_labels):
        y = top + pad + i * cell + (cell - pad) // 2
        draw.text((left - 4, y), text, fill="black", font=font, anchor="rm")
    for text, (x0, x1) in zip(block_labels, spans):
        draw.text((left + (x0 + x1) // 2, top // 2), fit(text, x1 - x0), fill="black", font=font, anchor="mm")
    return out


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
