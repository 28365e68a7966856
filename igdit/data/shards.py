"""Building WebDataset shards of normalised latents, and reading their meta.json.

Layout of a built folder:

    <out_dir>/train-000000.tar ... train-%06d.tar   training samples
    <out_dir>/val-000000.tar ...                    validation samples
    <out_dir>/.build/plan.json                      the build's arguments and normaliser, written first
    <out_dir>/.build/train-000000.json ...          per shard: samples written, images skipped (and why)
    <out_dir>/meta.json                             written last: its presence means the build finished

Each sample: ``__key__`` = the image's row in the source listing as 8 digits (``-flip`` appended for a
horizontally flipped copy; unique across train and val), ``cls`` = integer label, and the latent in one of two
formats (meta.json ``latent_format``):

  * ``sample`` (the identity encoder, ``--latent sample`` or ``mean``, and every build before the key existed):
    ``latent.npy`` = (c, h, w) float16 normalised latent, one fixed draw of the VAE posterior (or its mean);
  * ``posterior`` (``--latent posterior``, VAEs only): ``mean.npy`` and ``std.npy`` = (c, h, w) float32 by default
    (``--moments_dtype float16``: about half the bytes), the VAE posterior's mean and std carried through the normaliser
    (mean' = (mean - shift) scale, std' = std |scale|), so that x = mean' + std' eps is a normalised posterior
    draw; the DataModule draws a fresh eps every time it reads the sample (SiT+IG's training draws from stored
    moments at every step).

meta.json ``dtype`` is the dtype of the stored arrays (``float16`` for ``sample``; ``float32`` or ``float16`` for
``posterior``; builds that predate the choice wrote ``float16``). Why the moments default to float32: rounding
mean' to float16 moves it by up to 2^-11 |mean'| (9.8e-4 for |mean'| in [2, 4)), and what that costs is its size
against std', the spread of the draws. Measured on the digits' continuous unit-variance latents (upsampled,
channel-stats; ``igdit.bench.core.moments_rounding_error``, BENCHMARKS.md "Posterior moments: float16 vs float32"),
float16 moves mean' by up to 0.98 std' (0.16 on average) where std' = 1e-3, and by up to 0.098 std' (0.016) where
std' = 1e-2. SD-VAE's posterior std cannot be measured without its weights, so float16 is not shown to be harmless
for it; float32 stores the encoder's float32 moments exactly, at 35,840 instead of 19,456 bytes per 4x32x32 sample
(``bytes_per_sample``). std' itself rounds to float16 within 4e-4 of its size.

The plan is deterministic: the train/val split (stratified, seeded) and the cut of each split into
shards of ``samples_per_shard`` follow from the arguments and the source listing alone. So the build can
be split across ranks (torchrun: rank r writes the shards it is dealt, with their global names) and
resumed (``resume=True``: shards already closed are kept, the others are written again). A shard is
written to ``<name>.tar.tmp`` and renamed when it is complete, so a ``.tar`` is always a finished shard.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from tqdm import tqdm

from igdit.config import ConfigError, check_choice, check_number
from igdit.data.encoders import LatentEncoder, LatentNormalizer, build_encoder, images_to_unit
from igdit.data.sources import ArraySource, ImageSource, UnreadableImage, load_source, parse_source
from igdit.distributed import BuildGroup, check_device

FORMAT_VERSION = 1
META_FILE = "meta.json"
BUILD_DIR = ".build"
PLAN_FILE = "plan.json"
SPLITS = ("train", "val")
NORMALIZERS = ("encoder", "channel-stats")
DEFAULT_SAMPLES_PER_SHARD = 100
TAR_BLOCK = 512


def _igdit_version() -> str:
    try:
        return metadata.version("igdit")
    except metadata.PackageNotFoundError:  # running from a checkout that is not installed
        return "unknown"


MOMENTS_DTYPES = ("float16", "float32")
DEFAULT_MOMENTS_DTYPE = "float32"  # why: the module docstring


def latent_format(meta: dict) -> str:
    """The shards' latent format: ``posterior`` (mean.npy + std.npy) or ``sample`` (latent.npy; builds that
    predate the key)."""
    return meta.get("latent_format", "sample")


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (a shard's checksum, recorded in meta.json; `igdit data verify` recomputes it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_shards(root: str | Path) -> list[str]:
    """Problems with a built folder's shards against its meta.json: missing files and checksums that differ.
    An empty list: every shard is there and holds the bytes the build wrote."""
    root = Path(root)
    meta = load_meta(root)
    checksums = meta.get("shard_sha256")
    if not checksums:
        raise ConfigError("data.root", str(root), "holds a build without shard checksums (built before they were "
                                                  "recorded); rebuild it to verify it")
    problems = []
    sizes = meta.get("shard_bytes") or {}
    for split in SPLITS:
        listed = set()
        for index, expected in enumerate(checksums.get(split, [])):
            path = root / _shard_name(split, index)
            listed.add(path.name)
            size = (sizes.get(split) or [None] * (index + 1))[index] if index < len(sizes.get(split) or []) else None
            if not path.is_file():
                problems.append(f"{path.name}: missing")
            elif size is not None and path.stat().st_size != size:
                problems.append(f"{path.name}: {path.stat().st_size} bytes, meta.json says {size} (the file changed "
                                "after the build)")
            elif expected is not None and file_sha256(path) != expected:
                problems.append(f"{path.name}: checksum differs from meta.json (the file changed after the build)")
        problems += [f"{p.name}: not listed in meta.json (training refuses a folder with shards the build did not "
                     "write)" for p in sorted(root.glob(f"{split}-*.tar")) if p.name not in listed]
    return problems


def bytes_per_sample(latent_shape: Sequence[int], arrays: int = 1, dtype: str = "float16") -> int:
    """Bytes one sample takes in a shard: a tar header and padded data for each of ``arrays`` (c, h, w) arrays of
    ``dtype`` (128-byte npy header; 1 = latent.npy, 2 = mean.npy and std.npy) and for cls. (4, 32, 32) -> 10,240
    bytes, so 1 GiB holds ~105k SD-VAE latents; a posterior takes 19,456 bytes in float16, 35,840 in float32."""
    data = 128 + np.dtype(dtype).itemsize * math.prod(int(v) for v in latent_shape)
    return arrays * (TAR_BLOCK + math.ceil(data / TAR_BLOCK) * TAR_BLOCK) + 2 * TAR_BLOCK


def _write_json(path: Path, value: dict) -> None:
    """Atomically (write a temporary file, then rename): readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def _shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _existing_build(out: Path) -> tuple[list[str], bool]:
    """(names of finished shards in ``out``, whether there are traces of an unfinished build)."""
    if not out.is_dir():
        return [], False
    finished = sorted(p.name for p in out.iterdir() if p.suffix == ".tar")
    traces = bool(finished) or (out / BUILD_DIR).exists() or any(out.glob("*.tar.tmp"))
    return finished, traces


def _check_out_dir(out: Path, resume: bool) -> None:
    """Never write into a finished build; continue an unfinished one only when asked (``resume``)."""
    if out.exists() and not out.is_dir():
        raise ConfigError("out_dir", str(out), "is a file; choose a folder")
    if (out / META_FILE).exists():
        raise ConfigError("out_dir", str(out), f"already holds a finished build ({META_FILE}); choose another folder "
                          "or remove it yourself (igdit never deletes shards)")
    finished, traces = _existing_build(out)
    if traces and not resume:
        what = f"{len(finished)} finished shard(s) of an unfinished build" if finished else "an unfinished build"
        raise ConfigError("out_dir", str(out), f"already holds {what}; pass --resume to continue it with the same "
                          "arguments, or choose another folder (igdit never deletes shards)")
    if resume and finished and not (out / BUILD_DIR / PLAN_FILE).is_file():
        raise ConfigError("out_dir", str(out), f"holds {len(finished)} .tar file(s) but no {BUILD_DIR}/{PLAN_FILE}: "
                          "they were not written by a resumable igdit build; choose another folder")


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


class _Rows(torch.utils.data.Dataset):
    """source rows -> (row, (C, H, W) uint8 image or None, why it could not be read or None)."""

    def __init__(self, source: ImageSource, rows: Sequence[int]):
        self.source, self.rows = source, np.asarray(rows, dtype=np.int64)  # no per-row objects to copy on fork

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        try:
            return row, self.source.read(row), None
        except UnreadableImage as err:
            return row, None, err.error


def _as_list(items):
    return items


def _read(source: ImageSource, rows: Sequence[int], workers: int) -> Iterator[tuple]:
    """(row, image or None, error or None) for ``rows`` in order; ``workers`` processes decode the files."""
    loader = torch.utils.data.DataLoader(_Rows(source, rows), batch_size=32, num_workers=workers,
                                         collate_fn=_as_list, prefetch_factor=4 if workers else None)
    for chunk in loader:
        yield from chunk


def _to_unit(images: torch.Tensor, side: Optional[int]) -> torch.Tensor:
    """(N, C, H, W) uint8 -> float32 in [-1, 1], upsampled to side x side first if given."""
    x = images_to_unit(images)
    if side is not None and tuple(x.shape[-2:]) != (side, side):
        # Bilinear of values in [-1, 1] stays in [-1, 1] (convex combinations of neighbours).
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    return x


class _Encoder:
    """uint8 images -> normalised float32 latents: to [-1, 1], bilinear upsampling to side if needed, encode."""

    def __init__(self, encoder: LatentEncoder, side: Optional[int], batch: int):
        self.encoder, self.side, self.batch = encoder, side, batch

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """(N, C, H, W) uint8 -> (N, c, h, w) float32 encoder latents (not yet normalised), on the CPU."""
        out = []
        for start in range(0, images.shape[0], self.batch):
            x = _to_unit(images[start:start + self.batch], self.side)
            out.append(self.encoder.encode(x, seeds=seeds[start:start + self.batch]).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, H, W) uint8 -> the posterior's (mean, std), each (N, c, h, w) float32 on the CPU."""
        means, stds = [], []
        for start in range(0, images.shape[0], self.batch):
            mean, std = self.encoder.posterior(_to_unit(images[start:start + self.batch], self.side))
            means.append(mean.float().cpu())
            stds.append(std.float().cpu())
        return torch.cat(means), torch.cat(stds)


def _sample_seed(seed: int, row: int, flipped: bool) -> int:
    """The posterior-sample seed of one sample: depends on the build seed, the image and the flip only."""
    return (int(seed) << 32) + 2 * int(row) + int(flipped)


def _fit_normalizer(method: str, encode: _Encoder, source: ImageSource, rows: Sequence[int], seed: int,
                    workers: int, progress: bool = False) -> tuple[LatentNormalizer, dict]:
    """The normaliser the shards are written with, and how it was obtained (for meta.json)."""
    channels = encode.encoder.latent_shape(_image_shape(source, encode.side))[0]
    if method == "encoder":
        return encode.encoder.normalizer(channels), {"method": "encoder"}
    images, used, chunks = [], [], []
    with tqdm(total=len(rows), desc="channel statistics", unit="image", disable=not progress) as bar:
        for row, image, _ in _read(source, rows, workers):
            if image is not None:
                images.append(image)
                used.append(row)
            if len(images) == 256:  # encoded as they arrive: the bar moves with the encoder, not only the reader
                chunks.append(encode(torch.stack(images), [_sample_seed(seed, r, False) for r in used[-256:]]))
                images = []
            bar.update(1)
        if images:
            chunks.append(encode(torch.stack(images), [_sample_seed(seed, r, False)
                                                       for r in used[len(used) - len(images):]]))
    latents = torch.cat(chunks)
    return LatentNormalizer.from_latents(latents), {"method": "channel-stats", "images": len(used),
                                                   "rule": "shift = per-channel mean, scale = 1 / per-channel std"}


def _image_shape(source: ImageSource, side: Optional[int]) -> tuple[int, int, int]:
    c, h, w = source.image_shape
    return (c, side, side) if side is not None else (c, h, w)


def _write_shard(out: Path, split: str, index: int, items: list, encode: _Encoder, normalizer: LatentNormalizer,
                 flip: bool, seed: int, source: ImageSource, mtime: int, posterior: bool = False,
                 dtype: str = "float16") -> dict:
    """Encode and write one shard as <name>.tar.tmp, record it in .build/, then rename it to <name>.tar.
    ``dtype``: of the stored arrays (meta.json ``dtype``).

    Every member gets the build's integer ``mtime``: shards are then the same bytes whichever rank or run
    wrote them, and a member costs a 512-byte header (a float mtime adds a 1 KiB extended header)."""
    name = _shard_name(split, index)
    good = [(row, image) for row, image, _ in items if image is not None]
    skipped = [{"image": source.where(row), "error": err} for row, image, err in items if image is None]
    if skipped:  # one line per shard, not one per file: a folder of 10,000 bad files must not flood the terminal
        more = f" and {len(skipped) - 1} more, all listed in {BUILD_DIR}/{name[:-4]}.json" if len(skipped) > 1 else ""
        warnings.warn(f"{name}: skipped unreadable image {skipped[0]['image']} ({skipped[0]['error']}){more}",
                      stacklevel=2)
    samples = []  # (key, image, label, seed): each image, then its flipped copy when asked
    for row, image in good:
        samples.append((f"{row:08d}", image, row, _sample_seed(seed, row, False)))
        if flip:
            samples.append((f"{row:08d}-flip", image.flip(-1), row, _sample_seed(seed, row, True)))
    tmp = out / (name + ".tmp")
    with wds.TarWriter(str(tmp), mtime=mtime) as sink:
        if samples:
            images = torch.stack([s[1] for s in samples])
            if posterior:  # the moments through the normaliser: x = mean' + std' eps is a normalised draw
                mean, std = encode.posterior(images)
                scale = torch.tensor(normalizer.scale, dtype=std.dtype).abs().view(1, -1, 1, 1)
                members = {"mean.npy": normalizer.normalize(mean), "std.npy": std * scale}
            else:
                members = {"latent.npy": normalizer.normalize(encode(images, [s[3] for s in samples]))}
            arrays = {}
            for member, values in members.items():
                on_disk = values.to(getattr(torch, dtype))
                # float32 is what the encoder and normaliser computed in: only float16 can overflow here
                if dtype == "float16" and not torch.isfinite(on_disk).all():
                    raise ValueError(f"{name}: normalised {member[:-4]} overflows float16; check the normaliser's scale")
                arrays[member] = on_disk.numpy()
            for i, (key, _, row, _) in enumerate(samples):
                sink.write({"__key__": key, **{m: a[i] for m, a in arrays.items()}, "cls": int(source.labels[row])})
    record = {"shard": name, "samples": len(samples), "images": len(good), "skipped": skipped,
              "sha256": file_sha256(tmp), "bytes": tmp.stat().st_size}
    _write_json(out / BUILD_DIR / (name[:-4] + ".json"), record)
    os.replace(tmp, out / name)  # the shard exists under its name only once it is complete
    return record


def _check_device(device: str) -> None:
    check_device(device, "device")


def _resolve_samples_per_shard(samples_per_shard, shard_size_mb, latent_shape, flip, arrays: int = 1,
                               dtype: str = "float16") -> int:
    if samples_per_shard is not None and shard_size_mb is not None:
        raise ConfigError("shard_size_mb", shard_size_mb, "give --samples_per_shard or --shard_size_mb, not both")
    if shard_size_mb is not None:
        check_number("shard_size_mb", shard_size_mb, low=0, low_inclusive=False)
        samples_per_shard = max(1, int(shard_size_mb * 2**20 // bytes_per_sample(latent_shape, arrays, dtype)))
        samples_per_shard = max(2, samples_per_shard - samples_per_shard % 2) if flip else samples_per_shard
    samples_per_shard = DEFAULT_SAMPLES_PER_SHARD if samples_per_shard is None else samples_per_shard
    check_number("samples_per_shard", samples_per_shard, low=1, integer=True)
    if flip and samples_per_shard % 2:
        raise ConfigError("samples_per_shard", samples_per_shard, "--flip writes every training image twice "
                          "(as is and mirrored) into the same shard; choose an even number")
    return int(samples_per_shard)


def build_dataset(source: Union[str, ImageSource], out_dir, encoder: str = "identity", resolution: Optional[int] = None,
                  samples_per_shard: Optional[int] = None, val_fraction: float = 0.1, seed: int = 0,
                  progress: bool = True, *, shard_size_mb: Optional[float] = None, flip: bool = False,
                  normalizer: str = "encoder", stats_images: int = 10_000, vae_path: Optional[str] = None,
                  latent: Optional[str] = None, resume: bool = False, batch_size: int = 64,
                  workers: Optional[int] = None, device: Optional[str] = None,
                  moments_dtype: Optional[str] = None) -> dict:
    """Encode a source into train/val WebDataset shards under ``out_dir`` and return the meta.json dict.

    source: ``digits``, ``imagefolder:<dir>`` (or an ImageSource object); encoder: ``identity``,
    ``sd-vae-ft-ema``, ``sd-vae-ft-mse`` or ``diffusers:<folder or hub id>`` (weights from ``vae_path`` or the
    Hugging Face cache; ``latent`` = ``sample`` or ``mean`` of the posterior, or ``posterior``: its mean and
    std, drawn from at every read (module docstring)).
    moments_dtype: ``float32`` (default) or ``float16``, the dtype of a posterior build's mean.npy and std.npy
        (the module docstring says why float32); other builds store latent.npy in float16 and refuse it.
    resolution: imagefolder: the ADM centre-crop size (required); array sources: upsample to
        resolution x resolution (bilinear) before encoding, None keeps them.
    samples_per_shard / shard_size_mb: shard size as a count (default 100) or in MiB (one of the two).
    flip: also write a horizontally flipped copy of every training image (next to it, key ``<row>-flip``).
    normalizer: ``encoder`` (its published scaling, 0.18215 for SD-VAE) or ``channel-stats`` (per-channel
        mean and std of ``stats_images`` training images).
    val_fraction: share of each class held out for validation (stratified, seeded by ``seed``).
    resume: continue an unfinished build in ``out_dir`` (same arguments); finished shards are kept.
    batch_size: images per encoder call; workers: processes decoding image files (default: 0 for array
    sources, min(8, cores) for files); device: where the encoder runs (default cuda:LOCAL_RANK if available).
    Under torchrun every rank writes its share of the shards and rank 0 writes meta.json.
    Refuses (ConfigError on ``out_dir``) a finished build, and an unfinished one unless ``resume``.
    """
    # ---- every check first: nothing is read or written before they pass -------------------------------
    if isinstance(source, str):
        parse_source(source)
    check_choice("normalizer", normalizer, NORMALIZERS)
    # resolution, seed, batch_size and workers arrive typed (igdit data build's PositiveInt, NonNegativeInt)
    check_number("val_fraction", val_fraction, low=0, high=1, low_inclusive=False, high_inclusive=False)
    check_number("stats_images", stats_images, low=2, integer=True)
    if moments_dtype is not None:
        check_choice("moments_dtype", moments_dtype, MOMENTS_DTYPES)
    out = Path(out_dir)
    group = BuildGroup()
    if device is None:
        device = f"cuda:{group.local_rank}" if torch.cuda.is_available() else "cpu"
    _check_device(device)
    _check_out_dir(out, resume)
    enc = build_encoder(encoder, path=vae_path, latent=latent, device=device)
    data = load_source(source, resolution) if isinstance(source, str) else source
    spec = source if isinstance(source, str) else data.description.get("name", type(data).__name__)
    c, h, w = data.image_shape
    if isinstance(data, ArraySource) and resolution is not None and resolution < max(h, w):
        raise ConfigError("resolution", resolution, f"must be >= the source's image side ({h}x{w}); "
                          "only upsampling is offered")
    side = resolution if isinstance(data, ArraySource) else None
    image_shape = list(_image_shape(data, side))
    latent_shape = list(enc.latent_shape(image_shape))
    posterior = getattr(enc, "latent", None) == "posterior"
    if moments_dtype is not None and not posterior:
        raise ConfigError("moments_dtype", moments_dtype, "only posterior shards (--latent posterior) store moments; "
                          "latent.npy is always float16")
    dtype = (moments_dtype or DEFAULT_MOMENTS_DTYPE) if posterior else "float16"
    per_shard = _resolve_samples_per_shard(samples_per_shard, shard_size_mb, latent_shape, flip, 2 if posterior else 1,
                                           dtype)
    num_classes = len(data.class_names)
    train_rows, val_rows = _split(data.labels, num_classes, val_fraction, seed)
    rows = {"train": train_rows, "val": val_rows}
    images_per_shard = {"train": per_shard // 2 if flip else per_shard, "val": per_shard}
    num_shards = {s: math.ceil(len(rows[s]) / images_per_shard[s]) for s in SPLITS}
    if workers is None:
        workers = 0 if isinstance(data, ArraySource) else min(8, os.cpu_count() or 1)
    encode = _Encoder(enc, side, int(batch_size))
    args = {"source": spec, "encoder": enc.describe()["name"], "resolution": resolution, "samples_per_shard": per_shard,
            "flip": bool(flip), "val_fraction": float(val_fraction), "seed": int(seed), "normalizer": normalizer,
            "stats_images": int(stats_images) if normalizer == "channel-stats" else None,
            "latent": getattr(enc, "latent", None), "moments_dtype": dtype if posterior else None}

    with group:
        group.barrier()  # every rank has checked out_dir before rank 0 writes the plan into it

        def make_plan() -> tuple[dict, list]:
            """The plan (new, or the unfinished build's after checking it matches) and the shards still to write.
            Both come from rank 0 alone: a rank that lists the folder itself might already see shards that a
            faster rank has just finished, and the ranks would deal different lists."""
            plan_path = out / BUILD_DIR / PLAN_FILE
            if plan_path.is_file():  # resuming: the same arguments and listing, the recorded normaliser
                plan = json.loads(plan_path.read_text())
                # plans from before the choice wrote float16 moments
                recorded = {"moments_dtype": "float16" if plan["args"].get("latent") == "posterior" else None,
                            **plan["args"]}
                for key, value in args.items():
                    if recorded.get(key) != value:
                        raise ConfigError(key, value, f"the unfinished build in {out} used {recorded.get(key)!r}; "
                                          "resume it with the same arguments")
                if plan["fingerprint"] != data.fingerprint():
                    raise ConfigError("source", spec, f"is not what the unfinished build in {out} started from (its "
                                      "listing or images changed); build into a new folder")
            else:
                (out / BUILD_DIR).mkdir(parents=True, exist_ok=True)
                norm, fit = _fit_normalizer(normalizer, encode, data, train_rows[:stats_images], seed, workers,
                                            progress)
                plan = {"args": args, "fingerprint": data.fingerprint(), "normalizer": norm.to_dict(),
                        "normalizer_fit": fit, "num_shards": num_shards, "mtime": int(time.time())}
                _write_json(plan_path, plan)
            done = set(_existing_build(out)[0])
            return plan, [(s, i) for s in SPLITS for i in range(num_shards[s]) if _shard_name(s, i) not in done]

        plan, todo = group.on_rank0(make_plan)
        norm = LatentNormalizer.from_dict(plan["normalizer"])
        mine = todo[group.rank::group.world_size]  # dealt round-robin: ranks get equal shares, resumed or not
        shard_rows = {(s, i): rows[s][i * images_per_shard[s]:(i + 1) * images_per_shard[s]] for s, i in mine}
        stream = _read(data, [r for key in mine for r in shard_rows[key]], workers)
        total = sum(len(shard_rows[k]) for k in mine)
        with tqdm(total=total, desc=f"encoding {len(mine)} shard(s)", unit="image",
                  disable=not progress or group.rank != 0) as bar:
            for split, index in mine:
                items = [next(stream) for _ in shard_rows[(split, index)]]
                _write_shard(out, split, index, items, encode, norm, flip and split == "train", seed, data,
                             plan["mtime"], posterior, dtype)
                bar.update(len(items))
        stream.close()  # shuts the reader's worker processes down
        group.barrier()  # every shard is closed

        def write_meta() -> dict:
            missing = [_shard_name(s, i) for s in SPLITS for i in range(num_shards[s])
                       if not (out / _shard_name(s, i)).is_file()]
            if missing:
                raise RuntimeError(f"{len(missing)} shard(s) missing after the build, e.g. {missing[0]}")
            records = {s: [json.loads((out / BUILD_DIR / f"{s}-{i:06d}.json").read_text())
                           for i in range(num_shards[s])] for s in SPLITS}
            skipped = [s for split in SPLITS for r in records[split] for s in r["skipped"]]
            empty = [split for split in SPLITS if not sum(r["samples"] for r in records[split])]
            if empty:  # nothing to train or validate on: no meta.json, so no command takes the folder for data
                example = f"; e.g. {skipped[0]['image']}: {skipped[0]['error']}" if skipped else ""
                raise ConfigError("source", spec, f"gave no readable image for the {' and '.join(empty)} split"
                                  f"{'s' if len(empty) > 1 else ''} ({len(skipped)} unreadable{example}); the build "
                                  f"in {out} is left unfinished (no meta.json); fix or replace the images")
            meta = {
                "format_version": FORMAT_VERSION,
                "source": spec,
                "source_description": data.description,
                "encoder": enc.describe(),
                "normalizer": plan["normalizer"],
                "normalizer_fit": plan["normalizer_fit"],
                "latent_shape": latent_shape,
                "image_shape": image_shape,
                "source_image_shape": list(data.image_shape) if isinstance(data, ArraySource) else None,
                "resolution": image_shape[-1],
                "upsampled": side is not None and (side, side) != (h, w),
                "resize": ("bilinear, align_corners=False" if side is not None and (side, side) != (h, w) else None)
                          if isinstance(data, ArraySource) else "ADM center crop (BOX halving, BICUBIC, centre crop)",
                "num_classes": num_classes,
                "class_names": list(data.class_names),
                "num_samples": {s: sum(r["samples"] for r in records[s]) for s in SPLITS},
                "num_images": {s: sum(r["images"] for r in records[s]) for s in SPLITS},
                "num_shards": num_shards,
                "shard_samples": {s: [r["samples"] for r in records[s]] for s in SPLITS},
                "shard_sha256": {s: [r.get("sha256") for r in records[s]] for s in SPLITS},
                "shard_bytes": {s: [r.get("bytes") for r in records[s]] for s in SPLITS},
                "samples_per_shard": per_shard,
                "flip": bool(flip),
                "skipped_images": {"count": len(skipped), "first": skipped[:100]},
                "dtype": dtype,
                "latent_format": "posterior" if posterior else "sample",
                "members": ["mean.npy", "std.npy", "cls"] if posterior else ["latent.npy", "cls"],
                "keys": "row of the image in the source listing, 8 digits; '-flip' marks a mirrored copy",
                "split": "stratified by class (sklearn train_test_split)",
                "val_fraction": float(val_fraction),
                "seed": int(seed),
                "igdit_version": _igdit_version(),
            }
            # meta.json last, and atomically: a folder without it is an unfinished build.
            _write_json(out / META_FILE, meta)
            return meta

        return group.on_rank0(write_meta)


def _build_read_nothing(root: Path) -> bool:
    """Whether the shard records an unfinished build left in ``root/.build`` all say: no image was readable."""
    try:
        records = [json.loads(p.read_text()) for p in (root / BUILD_DIR).glob("*-*.json")]
    except (OSError, json.JSONDecodeError):
        return False
    return bool(records) and all(r.get("images") == 0 and r.get("skipped") for r in records)


def load_meta(root) -> dict:
    """Read ``<root>/meta.json`` (ConfigError naming ``data.root`` when it is missing or unreadable)."""
    path = Path(root) / META_FILE
    build = f"build it with `igdit data build digits {root}`"
    if not Path(root).is_dir():
        raise ConfigError("data.root", str(root), f"does not exist; {build}")
    if not path.is_file():
        if any(Path(root).glob("*.tar")):
            if _build_read_nothing(Path(root)):  # --resume would only fail the same way
                raise ConfigError("data.root", str(root), f"holds shards but no {META_FILE}: its build read no image "
                                  f"(the files are listed in {BUILD_DIR}/); fix or replace the images and build again")
            raise ConfigError("data.root", str(root), f"holds shards but no {META_FILE} (an unfinished build); "
                              "finish it with `igdit data build ... --resume` (same arguments)")
        raise ConfigError("data.root", str(root), f"has no {META_FILE}; {build}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError("data.root", str(root), f"has an unreadable {META_FILE} ({err}); {build}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError("data.root", str(root), f"holds shards of format {meta.get('format_version')!r}; this "
                          f"igdit reads format {FORMAT_VERSION}; rebuild them into a new folder")
    return meta
