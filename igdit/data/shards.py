"""Building WebDataset shards of normalised latents, and reading their meta.json.

Layout of a built folder:

    <out_dir>/train-000000.tar ... train-%06d.tar   training samples
    <out_dir>/val-000000.tar ...                    validation samples
    <out_dir>/meta.json                             written last: its presence means the build finished

Each sample: ``__key__`` = the image's row in the source as 8 digits (unique across train and val),
``latent.npy`` = (c, h, w) float16 normalised latent, ``cls`` = integer label.
"""
from __future__ import annotations

import json
import math
import os
from importlib import metadata
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from tqdm import tqdm

from igdit.config import ConfigError, check_number
from igdit.data.encoders import LatentEncoder, LatentNormalizer, build_encoder, images_to_unit
from igdit.data.sources import load_source, parse_source

FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "val")


def _igdit_version() -> str:
    try:
        return metadata.version("igdit")
    except metadata.PackageNotFoundError:  # running from a checkout that is not installed
        return "unknown"


def _refuse_existing(out: Path) -> None:
    """Never write into (or delete) a folder that already holds a build or shards."""
    if out.exists() and not out.is_dir():
        raise ConfigError("out_dir", str(out), "is a file; choose a folder")
    if out.is_dir():
        found = sorted(p.name for p in out.iterdir() if p.name == META_FILE or p.suffix == ".tar")
        if found:
            what = found[0] + (f" and {len(found) - 1} more build file(s)" if len(found) > 1 else "")
            raise ConfigError("out_dir", str(out), f"already holds {what}; choose another folder or remove "
                              "them yourself (igdit never deletes shards)")


def _split(labels: torch.Tensor, num_classes: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/val row indices (each in a seeded random order, so every shard mixes the classes)."""
    from sklearn.model_selection import train_test_split

    n = labels.shape[0]
    n_val = math.ceil(val_fraction * n)  # how scikit-learn rounds a float test_size
    if min(n_val, n - n_val) < num_classes:
        raise ConfigError("val_fraction", val_fraction, f"gives {n_val} val and {n - n_val} train images of {n}; "
                          f"each split needs at least one image of each of the {num_classes} classes")
    rows = np.arange(n)
    try:
        train, val = train_test_split(rows, test_size=val_fraction, stratify=labels.numpy(), random_state=seed)
    except ValueError as err:  # e.g. a class with a single image cannot be stratified
        raise ConfigError("val_fraction", val_fraction, f"cannot split this source by class: {err}") from None
    return train, val


def _to_unit(images: torch.Tensor, side: Optional[int]) -> torch.Tensor:
    """(N, C, H, W) uint8 -> float32 in [-1, 1], upsampled to side x side first if given."""
    x = images_to_unit(images)
    if side is not None and tuple(x.shape[-2:]) != (side, side):
        # Bilinear of values in [-1, 1] stays in [-1, 1] (convex combinations of neighbours).
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    return x


@torch.no_grad()
def _encode(images: torch.Tensor, encoder: LatentEncoder, side: Optional[int], batch: int = 512) -> torch.Tensor:
    """(N, C, H, W) uint8 -> (N, c, h, w) float32 encoder latents, upsampled to side x side first if given."""
    return torch.cat([encoder.encode(_to_unit(chunk, side)).float() for chunk in images.split(batch)])


def _train_feature_net(out: Path, data, train_rows: np.ndarray, val_rows: np.ndarray, side: Optional[int],
                       num_classes: int, seed: int) -> dict:
    """Train the domain feature network behind ``fd_digits`` on the training split's images (as the shards
    store them: upsampled when asked), measure it on the validation split, write it beside the shards."""
    from igdit.images import to_uint8
    from igdit.metrics.features import DIGITS_NET_FILE, save_digits_feature_net, train_digits_feature_net

    images = {split: to_uint8(_to_unit(data.images[rows], side)) for split, rows in (("train", train_rows),
                                                                                    ("val", val_rows))}
    net, info = train_digits_feature_net(images["train"], data.labels[train_rows], images["val"],
                                         data.labels[val_rows], num_classes, seed=seed)
    save_digits_feature_net(net, out / DIGITS_NET_FILE, info)
    return {"file": DIGITS_NET_FILE, "metric": "fd_digits", "network": "DigitsFeatureNet (small CNN, penultimate "
            "layer)", "num_features": net.num_features, "trained_on": "train split", "accuracy_on": "val split",
            **info}


def _write_split(out: Path, split: str, rows: np.ndarray, latents: torch.Tensor, labels: torch.Tensor,
                 samples_per_shard: int, progress: bool) -> int:
    """Write float16 latents (len(rows), c, h, w) as <split>-%06d.tar shards; returns the number of shards."""
    on_disk = latents.to(torch.float16)
    if not torch.isfinite(on_disk).all():
        raise ValueError(f"{split}: normalised latents overflow float16; check the normaliser's scale")
    arrays = on_disk.numpy()
    with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=samples_per_shard, verbose=0) as sink:
        for i, row in enumerate(tqdm(rows, desc=f"writing {split}", unit="sample", disable=not progress)):
            sink.write({"__key__": f"{int(row):08d}", "latent.npy": arrays[i], "cls": int(labels[i])})
    return len(list(out.glob(f"{split}-*.tar")))


def build_dataset(source: str, out_dir, encoder: str = "identity", resolution: Optional[int] = None,
                  samples_per_shard: int = 100, val_fraction: float = 0.1, seed: int = 0,
                  progress: bool = True, feature_net: Optional[bool] = None) -> dict:
    """Encode a source into train/val WebDataset shards under ``out_dir`` and return the meta.json dict.

    source: ``digits`` (or ``name:arg`` for sources that take one); encoder: a key of ``ENCODERS``;
    resolution: upsample images to resolution x resolution (bilinear) before encoding, None keeps them;
    val_fraction: share of each class held out for validation (stratified, seeded by ``seed``);
    feature_net: train the domain feature network of the ``fd_digits`` metric beside the shards (default:
    for the digits source only; its held-out accuracy goes into meta.json).
    Refuses (ConfigError on ``out_dir``) a folder that already holds meta.json or .tar files.
    """
    parse_source(source)
    enc = build_encoder(encoder)
    if resolution is not None:
        check_number("resolution", resolution, low=1, integer=True)
    check_number("samples_per_shard", samples_per_shard, low=1, integer=True)
    check_number("val_fraction", val_fraction, low=0, high=1, low_inclusive=False, high_inclusive=False)
    check_number("seed", seed, low=0, integer=True)
    out = Path(out_dir)
    _refuse_existing(out)

    data = load_source(source)
    n, c, h, w = data.images.shape
    if resolution is not None and resolution < max(h, w):
        raise ConfigError("resolution", resolution, f"must be >= the source's image side ({h}x{w}); "
                          "only upsampling is offered")
    num_classes = len(data.class_names)
    train_rows, val_rows = _split(data.labels, num_classes, val_fraction, seed)
    side = resolution
    image_shape = [c, side, side] if side is not None else [c, h, w]
    upsampled = side is not None and (side, side) != (h, w)

    latents = {split: _encode(data.images[rows], enc, side) for split, rows in zip(SPLITS, (train_rows, val_rows))}
    normalizer = enc.fit_normalizer(latents["train"])  # statistics from the training split only
    latent_shape = list(latents["train"].shape[1:])

    out.mkdir(parents=True, exist_ok=True)
    num_shards = {}
    for split, rows in zip(SPLITS, (train_rows, val_rows)):
        num_shards[split] = _write_split(out, split, rows, normalizer.normalize(latents[split]),
                                         data.labels[rows], int(samples_per_shard), progress)

    if feature_net is None:
        feature_net = parse_source(source)[0] == "digits"
    feature_info = _train_feature_net(out, data, train_rows, val_rows, side, num_classes, seed) if feature_net else None

    meta = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "source_description": data.description,
        "encoder": enc.describe(),
        "normalizer": normalizer.to_dict(),
        "latent_shape": latent_shape,
        "image_shape": image_shape,
        "source_image_shape": [c, h, w],
        "resolution": image_shape[-1],
        "upsampled": upsampled,
        "resize": "bilinear, align_corners=False" if upsampled else None,
        "num_classes": num_classes,
        "class_names": list(data.class_names),
        "num_samples": {"train": int(len(train_rows)), "val": int(len(val_rows))},
        "num_shards": num_shards,
        "samples_per_shard": int(samples_per_shard),
        "dtype": "float16",
        "keys": "row of the image in the source, 8 digits",
        "split": "stratified by class (sklearn train_test_split)",
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        "igdit_version": _igdit_version(),
        "feature_net": feature_info,
    }
    # meta.json last, and atomically: a folder without it is an unfinished build.
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / META_FILE)
    return meta


def load_meta(root) -> dict:
    """Read ``<root>/meta.json`` (ConfigError naming ``data.root`` when it is missing or unreadable)."""
    path = Path(root) / META_FILE
    build = f"build it with `igdit data build digits {root}`"
    if not Path(root).is_dir():
        raise ConfigError("data.root", str(root), f"does not exist; {build}")
    if not path.is_file():
        if any(Path(root).glob("*.tar")):
            raise ConfigError("data.root", str(root), f"holds shards but no {META_FILE} (an unfinished build); "
                              f"remove them yourself and {build}")
        raise ConfigError("data.root", str(root), f"has no {META_FILE}; {build}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError("data.root", str(root), f"has an unreadable {META_FILE} ({err}); {build}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError("data.root", str(root), f"holds shards of format {meta.get('format_version')!r}; this "
                          f"igdit reads format {FORMAT_VERSION}; rebuild them into a new folder")
    return meta
