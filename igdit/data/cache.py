"""What is computed from a data folder and cached beside its shards (reference statistics, small networks
trained on the data set's own images), and the key that ties each cache to the exact shards it came from.

Kept apart from the metrics so that every user of such a cache (the Fréchet-distance metric, a loss term's
frozen encoder) reads the same folder and the same key without importing the other.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from igdit.data.encoders import decode_latents
from igdit.images import to_uint8

REFERENCE_DIR = "fid_refs"


def reference_dir(datamodule) -> Path:
    """Where statistics and networks computed from a data folder are cached: <root>/fid_refs/."""
    return Path(datamodule.root) / REFERENCE_DIR


def data_fingerprint(datamodule, split: Optional[str] = None) -> str:
    """A hash of the shards of one split or of all: their names and sizes, and meta.json (each shard's sample count
    and checksum); anything cached from the data is keyed by it, so a rebuilt, truncated or extended data set never
    meets a stale cache. (A same-size rewrite is what `igdit data verify` finds: it compares the checksums.)"""
    shards = {s: [(Path(u).name, _size(u)) for u in (datamodule.train_urls if s == "train" else datamodule.val_urls)]
              for s in ((split,) if split else ("train", "val"))}
    return hashlib.sha256(json.dumps({"shards": shards, "meta": datamodule.meta}, sort_keys=True).encode()).hexdigest()


def _size(url: str) -> Optional[int]:
    return Path(url).stat().st_size if Path(url).is_file() else None  # remote shards: their names only


def split_images(datamodule, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (N, C, H, W) uint8 and labels (N,) of a split, decoded from its shards in shard order with the
    shards' own encoder and normaliser."""
    images, labels = [], []
    for latents, y in datamodule.latent_batches(split, 512):
        images.append(to_uint8(decode_latents(latents, datamodule.meta)))
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


def train_classifier(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int,
                     batch_size: int, lr: float, weight_decay: float = 1e-4, progress: bool = False,
                     desc: str = "training") -> torch.nn.Module:
    """Train a small network (``net.body`` then ``net.head``) as a classifier on images (N, C, H, W) in [-1, 1] with
    labels (N,): AdamW with a one-cycle schedule, each batch shifted by up to one pixel (padding with -1, the
    background, and cropping back) because the data sets it serves are small. Deterministic for a fixed ``seed``
    (its own generator; the global RNG is not touched). Returns ``net`` in eval mode, frozen. The fd_digits
    metric network and REPA's digits encoder are both trained here. progress: a bar over the epochs (``desc``)."""
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(images) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    height, width = images.shape[-2:]
    net.train()
    for _ in tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=False):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
            x = F.pad(images[rows], (1, 1, 1, 1), value=-1.0)[..., dy:dy + height, dx:dx + width]
            loss = F.cross_entropy(net.head(net.body(x)), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return net.eval().requires_grad_(False)
