"""LatentDataModule: streams (latent, label) batches from the WebDataset shards built by `igdit data build`.

Training stream, per rank and DataLoader worker (WebDataset reads the rank from RANK/WORLD_SIZE or
torch.distributed, the worker from the DataLoader):

    sorted shard list -> split_by_node -> split_by_worker        (ranks and workers read DISJOINT shards)
      -> passes over that subset, forever; each pass: shards in a fresh order, samples through a shuffle
         buffer that is emptied at the end of the pass          (seed from seed, rank, worker, pass)
      -> (x, y) -> full per-device batches
      -> epoch of steps_per_epoch batches                         (the same count on every rank: no DDP hang)

An epoch starts a new pass on every worker, and by default it is as long as the smallest worker's pass
(in full batches): within an epoch no sample is read twice. When every (rank, worker) holds the same
number of samples and that number is a multiple of the per-device batch (shard count divisible by
ranks x workers, equal shards), an epoch reads every training sample exactly once.

Validation: every rank reads ALL val shards once, in shard order, unshuffled, last partial batch kept.

Posterior shards (meta.json ``latent_format: posterior``) hold each sample's normalised posterior mean and std;
the training stream draws x = mean + std eps afresh every time it reads a sample, from one generator per
(rank, worker, pass) seeded with (seed, rank, worker, pass): a fixed seed reproduces every draw, and every pass
(epoch) draws anew. Validation and reference reads draw once per sample, seeded by the data seed and the
sample's key, so they are the same at every evaluation.
"""
from __future__ import annotations

import glob
import io
import itertools
import logging
import math
import os
import random
import zlib
from functools import partial
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import numpy as np
import torch
import webdataset as wds
from jsonargparse.typing import ClosedUnitInterval, NonNegativeInt, PositiveInt
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from igdit.config import ConfigError, TrainingStopped
from igdit.data.encoders import LatentNormalizer
from igdit.data.shards import MOMENTS_DTYPES, file_sha256, latent_format, load_meta


log = logging.getLogger(__name__)


def resolve_shards(spec: Optional[str], root: Path, split: str, field: str) -> list[str]:
    """Shard paths for one split, in a fixed (sorted or written) order that every rank agrees on.

    spec None: ``<root>/<split>-*.tar``. Otherwise a brace pattern (``train-{000000..000016}.tar``), a glob,
    or ``a.tar::b.tar``; relative paths are taken inside ``root``; URLs (``s3://``, ``pipe:``) pass as given.
    """
    if spec is None:
        urls = sorted(glob.glob(str(root / f"{split}-*.tar")))
        if not urls:
            raise ConfigError("data.root", str(root), f"holds no {split}-*.tar shards; build them with "
                              f"`igdit data build digits {root}`")
        return urls
    if not isinstance(spec, str) or not spec:
        raise ConfigError(field, spec, "expected a shard pattern such as 'train-{000000..000016}.tar' or 'train-*.tar'")
    if "://" in spec or spec.startswith("pipe:"):
        return wds.shardlists.expand_urls(spec)  # remote shards: WebDataset reports unreadable ones when it reads
    pattern = spec if os.path.isabs(spec) else str(root / spec)
    expanded = wds.shardlists.expand_urls(pattern)  # braces and '::' lists, as WebDataset itself expands them
    if any(ch in pattern for ch in "*?["):
        urls = sorted({path for pat in expanded for path in glob.glob(pat)})
    else:
        missing = [u for u in expanded if not os.path.isfile(u)]
        if missing:
            raise ConfigError(field, spec, f"names {len(missing)} missing file(s), e.g. {missing[0]}")
        urls = expanded
    if not urls:
        raise ConfigError(field, spec, f"matches no shard files (looked for {pattern})")
    return urls


def npy_header(latent_shape: tuple, dtype: str = "float16") -> bytes:
    """The bytes ``np.save`` writes before the data of a ``dtype`` array of ``latent_shape`` (what the build writes;
    meta.json ``dtype``)."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(latent_shape, dtype))
    return buffer.getvalue()[: -np.dtype(dtype).itemsize * math.prod(latent_shape)]


def _read_npy(raw: bytes, latent_shape: tuple, header: bytes, dtype: str = "float16") -> np.ndarray:
    """A (c, h, w) array from its .npy bytes: straight from the bytes as ``dtype`` when they start with exactly
    ``header`` (``npy_header(latent_shape, dtype)``; parsing the npy header costs about a third of a sample's
    time), else WebDataset's decoder (any dtype)."""
    if header and raw.startswith(header) and len(raw) == len(header) + np.dtype(dtype).itemsize * math.prod(latent_shape):
        return np.frombuffer(raw, dtype, offset=len(header)).reshape(latent_shape)
    latent = wds.autodecode.npy_loads(raw)
    if tuple(latent.shape) != latent_shape:
        raise ValueError(f"latent shape {tuple(latent.shape)}, meta.json says {latent_shape}")
    return latent


def _to_tensors(sample: dict, latent_shape: tuple, with_keys: bool, header: bytes = b"", posterior: bool = False,
                dtype: str = "float16"):
    """Raw tar sample -> (x float32 (c, h, w), y long ()) or (key, x, y); posterior shards give the moments
    in place of x: (mean, std, y, pass) or (key, mean, std, y, pass), pass = the RepeatShards pass it came from
    (None outside training). ``header`` and ``dtype``: the arrays' npy header and dtype (``_read_npy``).

    A failure names the sample and its shard, so the line SkipCounter logs says what was
    skipped.
    """
    key, url = sample.get("__key__"), sample.get("__url__")
    try:
        members = ("mean.npy", "std.npy") if posterior else ("latent.npy",)
        arrays = [_read_npy(sample[m], latent_shape, header, dtype) for m in members]
        label = wds.autodecode.decoders["cls"](sample["cls"])
    except Exception as err:
        raise ValueError(f"skipped sample {key} of {url}: {err!r}") from err
    # a copy: float32 from frombuffer would otherwise share the sample's read-only bytes
    tensors = [torch.from_numpy(np.array(a, dtype=np.float32)) for a in arrays]
    y = torch.tensor(label, dtype=torch.long)
    out = (*tensors, y, sample.get("__pass__")) if posterior else (*tensors, y)
    return (key, *out) if with_keys else out


class PosteriorDraws(wds.PipelineStage):
    """Stage after decoding posterior shards: (…, mean, std, y, pass) -> (…, x, y), x = mean + std eps.

    In training (``pass`` = (worker, pass, place in the pass), set by RepeatShards) eps is seeded with (seed, rank,
    worker, pass, place): the samples of a pass arrive in a seeded order, so a fixed seed reproduces every draw, every pass
    draws anew, and a stream resumed in the middle of a pass draws what the uninterrupted one would have. Outside training (``pass`` None; the input carries
    keys) each sample's eps is seeded by (seed, crc32 of its key): the same draw at every evaluation.
    ``keep_keys``: keep the key in front of the output (the input has one whenever pass is None).
    """

    def __init__(self, seed: int, keep_keys: bool):
        self.seed, self.keep_keys = seed, keep_keys

    def run(self, src):
        rank = wds.utils.pytorch_worker_info()[0]
        generator = torch.Generator()
        for item in src:
            *head, mean, std, y, pass_ = item
            if pass_ is None:  # a keyed, evaluation-time read
                generator.manual_seed(wds.utils.make_seed(self.seed, zlib.crc32(str(head[0]).encode())))
            else:  # trailing 2: not a shuffle seed
                generator.manual_seed(wds.utils.make_seed(self.seed, rank, *pass_, 2))
            x = mean + std * torch.randn(mean.shape, generator=generator)
            yield (*head, x, y) if self.keep_keys else (x, y)


def _too_few_shards(num_shards: int, world_size: int, workers: int) -> str:
    return (f"holds {num_shards} train shard(s); {world_size} rank(s) x {workers} worker(s) each read their own "
            f"shards and need at least {world_size * workers}; rebuild with a smaller --samples_per_shard "
            "or lower data.num_workers")


def shard_subsets(num_shards: int, world_size: int, workers: int) -> list[list[int]]:
    """Shard indices each (rank, worker) reads, in rank-major order: WebDataset's split_by_node then
    split_by_worker (every world_size-th shard from the rank, then every workers-th of those)."""
    return [list(range(num_shards))[rank::world_size][worker::workers]
            for rank in range(world_size) for worker in range(workers)]


class ShardCheck:
    """Each shard a process reads is checked once, as it is opened: its size and SHA-256 must be what meta.json
    recorded when the build wrote it (a shard overwritten with zeros or random bytes otherwise trained silently, or
    stopped as a "non-finite training loss"). Hashing reads the file once more per process, which the page cache
    mostly absorbs; shards that meta.json does not describe (built before checksums, or named explicitly outside
    data.root) are read as they are.

    expected: {absolute path: (size in bytes or None, sha256 hex or None)}."""

    verified: set = set()  # per process (a forked DataLoader worker inherits what its parent checked)

    def __init__(self, root: str, expected: dict):
        self.root, self.expected = root, expected

    def __call__(self, url: str) -> None:
        path = os.path.abspath(url)
        size, digest = self.expected.get(path, (None, None))
        if path in ShardCheck.verified or (size is None and digest is None):
            return
        actual = os.path.getsize(path)
        problem = None
        if size is not None and actual != size:
            problem = f"is {actual} bytes, meta.json says {size}"
        elif digest is not None and file_sha256(Path(path)) != digest:
            problem = "does not hold the bytes the build wrote (its SHA-256 differs from meta.json's)"
        if problem:
            raise TrainingStopped(f"data: shard {url} {problem}; it changed after the build: restore or rebuild it "
                                  f"(`igdit data verify {self.root}` lists every damaged shard)")
        ShardCheck.verified.add(path)

    def stage(self, src):
        """A pipeline stage over WebDataset's shard dicts ({"url": ...}): checks each before it is read."""
        for shard in src:
            self(shard["url"])
            yield shard


class CheckedRead:
    """Shard dicts -> raw samples: each shard checked (``ShardCheck``), then read by ``read`` (WebDataset's
    tarfile_to_samples); one pipeline stage, picklable for spawned DataLoader workers."""

    def __init__(self, check: ShardCheck, read):
        self.check, self.read = check, read

    def __call__(self, src):
        return self.read(self.check.stage(src))


class SkipCounter:
    """Samples a stream could not read (a damaged tar member, a latent of the wrong shape), counted across the
    DataLoader's worker processes (a shared value) and logged one by one with their shard and reason.

    ``handler`` replaces WebDataset's warn_and_continue, which sleeps half a second per skip (one bad shard of 100
    samples made a run 13x slower)."""

    def __init__(self):
        self.count = torch.multiprocessing.get_context("fork").Value("q", 0)

    def handler(self, exn: BaseException) -> bool:
        with self.count.get_lock():
            self.count.value += 1
        log.warning("igdit data: skipped a sample: %s", " ".join(str(exn).split()))
        return True

    @property
    def skipped(self) -> int:
        return int(self.count.value)

    def __getstate__(self):  # a spawned worker: counts in its own process (fork, Linux's default, shares)
        return {"count": None}

    def __setstate__(self, state):
        self.count = torch.multiprocessing.get_context("fork").Value("q", 0) if state["count"] is None else state["count"]


class ResumePoint:
    """Where a resumed run's data stream starts: ``batches`` per-device batches were consumed before the checkpoint.

    Epoch e of the stream is pass e of every (rank, worker), and the DataLoader takes batch k of an epoch from
    worker k mod W, starting every epoch at worker 0. So for the rest of the interrupted epoch worker w plays the
    part of worker (w + offset) mod W (reads its shards, from where it had stopped), and batch k after the resume
    is exactly batch offset + k of the uninterrupted epoch; later epochs are whole and every worker is itself.
    """

    def __init__(self, batches: int, steps_per_epoch: int):
        self.epoch, self.offset = divmod(int(batches), steps_per_epoch)

    def role(self, worker: int, workers: int) -> int:
        """The worker whose part worker ``worker`` plays for the rest of the interrupted epoch."""
        return (worker + self.offset) % workers

    def done(self, role: int, workers: int) -> int:
        """Batches worker ``role`` of ``workers`` had delivered in the interrupted epoch."""
        return len(range(role, self.offset, workers))


class EpochOfBatches(wds.PipelineStage):
    """The last stage: one epoch is the first ``per_worker`` batches of this worker's current pass; the first
    epoch after a resume skips the batches that were delivered before the checkpoint (they are read and decoded
    again, at most one epoch's share, so a sample that fails to decode shifts nothing). A fresh iterator per
    epoch starts the next pass of RepeatShards."""

    def __init__(self, per_worker: int, resume: Optional[ResumePoint] = None):
        self.per_worker, self.resume = per_worker, resume

    def run(self, src):
        done = 0
        if self.resume is not None:
            _, _, worker, workers = wds.utils.pytorch_worker_info()
            done, self.resume = self.resume.done(self.resume.role(worker, workers), workers), None
        yield from itertools.islice(src, done, self.per_worker)


class RepeatShards(wds.PipelineStage):
    """Stage after split_by_node: passes over this worker's share of the rank's shards (every workers-th, as
    WebDataset's split_by_worker deals them), forever.

    Each pass visits the subset in a fresh order and sends its samples through a shuffle buffer that is
    emptied before the next pass starts, so a pass yields every sample of the subset exactly once. Seeds
    come from (seed, rank, worker, pass). The pass counter lives on the stage, which persists across
    epochs (main process, or persistent DataLoader workers), so a new epoch starts a new pass instead of
    replaying the first one.
    """

    def __init__(self, num_shards: int, seed: int, field: str, value, shuffle_buffer: int,
                 expected_node: Optional[tuple] = None, resume: Optional[ResumePoint] = None, handler=None,
                 check: Optional[ShardCheck] = None):
        self.handler = handler or wds.reraise_exception
        self.check = check
        self.num_shards, self.seed, self.field, self.value = num_shards, seed, field, value
        self.shuffle_buffer = shuffle_buffer
        self.expected_node = expected_node  # (rank, world_size) the trainer reported, to catch a silent rank-0 fallback
        self.passes = 0 if resume is None else resume.epoch
        self.resume = resume

    def run(self, src):
        shards = list(src)
        rank, world_size, worker, workers = wds.utils.pytorch_worker_info()
        if self.expected_node is not None and (rank, world_size) != self.expected_node:
            raise RuntimeError(f"WebDataset sees rank {rank} of {world_size} but the trainer runs rank "
                               f"{self.expected_node[0]} of {self.expected_node[1]}: ranks would read the same "
                               "shards. Set RANK and WORLD_SIZE, or use the 'fork' DataLoader start method.")
        if self.num_shards < world_size * workers:
            raise ConfigError(self.field, self.value, _too_few_shards(self.num_shards, world_size, workers))
        role = worker
        if self.resume is not None:  # the interrupted pass of the worker whose part this one plays
            role, self.resume = self.resume.role(worker, workers), None
        shards = shards[role::workers]
        while True:
            order = list(shards)
            random.Random(wds.utils.make_seed(self.seed, rank, role, self.passes)).shuffle(order)
            seed = wds.utils.make_seed(self.seed, rank, role, self.passes, 1)  # trailing 1: not the shard seed
            self.passes += 1
            opened = self.check.stage(iter(order)) if self.check is not None else iter(order)
            samples = wds.tarfile_to_samples(handler=self.handler)(opened)
            count = 0
            for sample in wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=seed)(samples):
                count += 1
                # (worker, pass, place in it): a posterior draw is seeded by them, so a resumed stream draws what
                # the uninterrupted one drew
                sample["__pass__"] = (role, self.passes - 1, count)
                yield sample
            if count == 0:
                urls = [s["url"] for s in shards]
                raise RuntimeError(f"rank {rank} worker {worker}: no readable sample in its {len(urls)} shard(s) "
                                   f"({urls[0]} ...)")


class LatentDataModule(pl.LightningDataModule):
    """(x, y) batches of normalised latents x (B, c, h, w) float32 and labels y (B,) long from built shards.

    root: folder written by `igdit data build` (holds meta.json, train-*.tar, val-*.tar).
    batch_size: GLOBAL batch across all devices; each device gets batch_size // world_size.
    num_workers: DataLoader workers per device (persistent when > 0).
    shuffle_buffer: samples held in the shuffle buffer of each worker.
    val_batch_size: per-device validation batch (default: the per-device training batch).
    steps_per_epoch: training batches per epoch on every rank, rounded up to a multiple of num_workers
        (default: as many full batches as the smallest (rank, worker) share of the shards holds, so that
        no sample is read twice in an epoch; see the module docstring for when every sample is read).
    seed: base seed of the shard and sample shuffles.
    train_shards, val_shards: shard patterns overriding root/train-*.tar and root/val-*.tar.
    max_skipped_fraction: a training run stops (one line) when its training stream could not read or decode more
        than this share of the samples it read, counted against at least one epoch's training samples of the rank;
        every skip (validation and FID reference reads included) is counted, logged as ``data/skipped`` and
        reported with its shard and reason, without WebDataset's half-second pause per skip.

    Every shard is checked against meta.json: its size when the module is built, its SHA-256 once per process when a
    stream first opens it (``ShardCheck``); a train-/val-*.tar in root that meta.json does not list is refused.
    """

    def __init__(
        self,
        root: str = "data/digits",
        batch_size: PositiveInt = 128,
        num_workers: NonNegativeInt = 0,
        shuffle_buffer: PositiveInt = 1000,
        val_batch_size: Optional[PositiveInt] = None,
        steps_per_epoch: Optional[PositiveInt] = None,
        seed: NonNegativeInt = 0,
        train_shards: Optional[str] = None,
        val_shards: Optional[str] = None,
        max_skipped_fraction: ClosedUnitInterval = 0.01,
    ):
        super().__init__()
        if not isinstance(root, (str, os.PathLike)) or not str(root):
            raise ConfigError("data.root", root, "expected a folder built by `igdit data build`")
        self.save_hyperparameters()
        self.root = str(root)
        self.batch_size, self.num_workers, self.shuffle_buffer = int(batch_size), int(num_workers), int(shuffle_buffer)
        self.val_batch_size, self.seed = val_batch_size, int(seed)
        self.train_shards_spec = train_shards
        # Read everything the run depends on now, so missing data fails before any compute.
        self._meta = load_meta(self.root)
        self.train_urls = resolve_shards(train_shards, Path(self.root), "train", "data.train_shards")
        self.val_urls = resolve_shards(val_shards, Path(self.root), "val", "data.val_shards")
        for split, spec in (("train", train_shards), ("val", val_shards)):
            listed = [f"{split}-{i:06d}.tar" for i in range(self._meta["num_shards"][split])]
            if spec is None:  # the build's own shards: every one meta.json lists must be there, and no other
                missing = [name for name in listed if not (Path(self.root) / name).is_file()]
                if missing:
                    raise ConfigError("data.root", self.root, f"misses {missing[0]} ({len(missing)} of {len(listed)} "
                                      f"{split} shards meta.json lists); restore it or rebuild the data")
            urls = self.train_urls if split == "train" else self.val_urls
            inside = [u for u in urls if "://" not in u and os.path.dirname(os.path.abspath(u)) ==
                      os.path.abspath(self.root)]
            foreign = [os.path.basename(u) for u in inside if os.path.basename(u) not in listed]
            if foreign:
                field_ = "data.root" if spec is None else f"data.{split}_shards"
                raise ConfigError(field_, self.root if spec is None else spec, f"holds {foreign[0]}, which "
                                  f"{self.root}/meta.json does not list (it lists {len(listed)} {split} shards): a file "
                                  "the build did not write; move it out of the folder or rebuild the data")
            if spec is None:
                urls[:] = [str(Path(self.root) / name) for name in listed]
        if not self._meta["num_samples"]["train"] or not self._meta["num_samples"]["val"]:
            raise ConfigError("data.root", self.root, f"holds {self._meta['num_samples']['train']} train and "
                              f"{self._meta['num_samples']['val']} val samples (meta.json); every image of the build "
                              "was unreadable: rebuild it from a source with readable images")
        self.check = ShardCheck(self.root, self._expected_shards())
        for url in self.train_urls + self.val_urls:  # sizes now (a stat each): a truncated shard stops before compute
            size, _ = self.check.expected.get(os.path.abspath(url), (None, None))
            if size is not None and os.path.getsize(url) != size:
                raise ConfigError("data.root", self.root, f"holds {os.path.basename(url)} of {os.path.getsize(url)} "
                                  f"bytes, meta.json says {size}: it changed after the build; restore or rebuild it "
                                  f"(`igdit data verify {self.root}`)")
        self.skips = SkipCounter()  # every sample any stream could not read (logged as data/skipped)
        self.train_skips = SkipCounter()  # those of the training stream alone (data.max_skipped_fraction)
        self.max_skipped_fraction = float(max_skipped_fraction)
        self._normalizer = LatentNormalizer.from_dict(self._meta["normalizer"])
        self.latent_format = latent_format(self._meta)
        self.dtype = self._meta.get("dtype", "float16")  # builds before the key wrote float16
        if self.dtype not in MOMENTS_DTYPES:
            raise ConfigError("data.root", self.root, f"holds {self.dtype!r} arrays (meta.json dtype); this igdit reads "
                              f"{' or '.join(MOMENTS_DTYPES)}")
        self.shard_samples = self._train_shard_samples()
        self.num_train_samples = sum(self.shard_samples)
        self._steps_per_epoch = steps_per_epoch
        self._world_size = 1
        self._expected_node: Optional[tuple] = None
        self._resume_batches: Optional[int] = None  # set from a checkpoint: where the stream continues

    # ---- what the shards hold -------------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        return self._meta

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c, h, w = self._meta["latent_shape"]
        return (int(c), int(h), int(w))

    @property
    def num_classes(self) -> int:
        return int(self._meta["num_classes"])

    @property
    def normalizer(self) -> LatentNormalizer:
        return self._normalizer

    @property
    def per_device_batch_size(self) -> int:
        return self.batch_size // self._world_size

    def _train_shard_samples(self) -> list[int]:
        """Samples in each of self.train_urls: meta.json's per-shard counts where it has them (builds since
        shard_samples was recorded), else the build's average per shard."""
        meta = self._meta
        average = meta["num_samples"]["train"] / max(1, meta["num_shards"]["train"])
        known = {f"train-{i:06d}.tar": n for i, n in enumerate(meta.get("shard_samples", {}).get("train", []))}
        in_root = {os.path.abspath(os.path.join(self.root, name)) for name in known}
        return [known[os.path.basename(u)] if os.path.abspath(u) in in_root else max(1, round(average))
                for u in self.train_urls]

    def _expected_shards(self) -> dict:
        """{absolute path of each shard meta.json describes: (size, sha256)} (None where the build did not record it)."""
        out = {}
        for split in ("train", "val"):
            digests = self._meta.get("shard_sha256", {}).get(split) or []
            sizes = self._meta.get("shard_bytes", {}).get(split) or []
            for i in range(self._meta["num_shards"][split]):
                path = os.path.abspath(os.path.join(self.root, f"{split}-{i:06d}.tar"))
                out[path] = (sizes[i] if i < len(sizes) else None, digests[i] if i < len(digests) else None)
        return out

    @property
    def steps_per_epoch(self) -> int:
        """Training batches per epoch on every rank (a multiple of the worker count, the same on every rank)."""
        workers = max(1, self.num_workers)
        if self._steps_per_epoch is not None:
            return math.ceil(self._steps_per_epoch / workers) * workers
        smallest = min(sum(self.shard_samples[i] for i in subset)
                       for subset in shard_subsets(len(self.train_urls), self._world_size, workers))
        return max(1, smallest // self.per_device_batch_size) * workers

    def check_model(self, latent_shape, num_classes: int) -> None:
        """Raise a one-line ConfigError when a model's (c, h, w) input or class count differs from the shards'."""
        c, h, w = self.latent_shape
        mc, mh, mw = (int(v) for v in latent_shape)
        where = f"the shards in {self.root}"
        if mc != c:
            raise ConfigError("model.in_channels", mc, f"{where} hold {c}-channel latents ({c}x{h}x{w}); "
                              f"set model.in_channels to {c}")
        if (mh, mw) != (h, w):
            raise ConfigError("model.input_size", mh if mh == mw else (mh, mw),
                              f"{where} hold {h}x{w} latents; set model.input_size to {h}")
        if int(num_classes) != self.num_classes:
            raise ConfigError("model.num_classes", int(num_classes), f"{where} have {self.num_classes} classes; "
                              f"set model.num_classes to {self.num_classes}")

    def _check_shard_count(self, world_size: int) -> None:
        workers = max(1, self.num_workers)
        if len(self.train_urls) < world_size * workers:
            field, value = ("data.root", self.root) if self.train_shards_spec is None \
                else ("data.train_shards", self.train_shards_spec)
            raise ConfigError(field, value, _too_few_shards(len(self.train_urls), world_size, workers))

    def check_world_size(self, world_size: int) -> None:
        """The global batch must divide among the ranks, and every rank x worker needs its own shards.

        One-line ConfigErrors; a shard count that does not divide among ranks x workers only warns (ranks
        then hold different numbers of samples and an epoch cannot read every sample exactly once)."""
        if self.batch_size % world_size:
            raise ConfigError("data.batch_size", self.batch_size, f"must be divisible by the world size {world_size} "
                              "(it is the global batch across all devices)")
        self._check_shard_count(world_size)
        workers = max(1, self.num_workers)
        smallest = min(sum(self.shard_samples[i] for i in subset)
                       for subset in shard_subsets(len(self.train_urls), world_size, workers))
        if self.batch_size // world_size > smallest:  # no reader could fill one batch: it would read forever
            raise ConfigError("data.batch_size", self.batch_size, f"gives each of the {world_size} device(s) "
                              f"{self.batch_size // world_size} samples per batch, and a reader ({world_size} rank(s) x "
                              f"{workers} worker(s) share the {len(self.train_urls)} train shards) holds as few as "
                              f"{smallest}; use at most {smallest * world_size}, or fewer data.num_workers")
        readers = world_size * max(1, self.num_workers)
        if len(self.train_urls) % readers:
            rank_zero_warn(f"{len(self.train_urls)} train shards do not divide among {world_size} rank(s) x "
                           f"{max(1, self.num_workers)} worker(s): readers hold different numbers of samples, so an "
                           f"epoch cannot read every sample exactly once; use a multiple of {readers} shards")

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        world_size = int(getattr(trainer, "world_size", 1)) if trainer is not None else 1
        self.check_world_size(world_size)
        self._world_size = world_size
        rank = getattr(trainer, "global_rank", None)
        self._expected_node = (rank, world_size) if isinstance(rank, int) and world_size > 1 else None
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        if hasattr(module, "latent_shape") and hasattr(module, "num_classes"):
            self.check_model(module.latent_shape, module.num_classes)

    # ---- pipelines ----------------------------------------------------------------------------------
    def _decode_stages(self, with_keys: bool, training: bool = False) -> list:
        """Raw tar samples -> (x, y) or (key, x, y). Posterior shards: a draw per read (``PosteriorDraws``),
        seeded per pass in training (the samples come from RepeatShards), per key otherwise."""
        posterior = self.latent_format == "posterior"
        handler = self._train_skip if training else self.skips.handler
        decode = wds.map(partial(_to_tensors, latent_shape=self.latent_shape, with_keys=with_keys or (posterior and not training),
                                 header=npy_header(self.latent_shape, self.dtype), posterior=posterior,
                                 dtype=self.dtype), handler=handler)
        stages = [] if training else [CheckedRead(self.check, wds.tarfile_to_samples(handler=handler))]
        stages.append(decode)
        if posterior:
            stages.append(PosteriorDraws(self.seed, keep_keys=with_keys))
        return stages

    def _train_skip(self, exn: BaseException) -> bool:
        self.train_skips.handler(exn)
        with self.skips.count.get_lock():
            self.skips.count.value += 1
        return True

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Every training batch: log the skip count when it grew, and stop a run whose training stream skips more
        than data.max_skipped_fraction of the samples it read, counted against at least one epoch's training samples
        of this rank (a few damaged samples must not stop a run at its first step; the FID reference and feature
        network read the data too, and their skips are logged, not counted here)."""
        trainer = self.trainer
        if trainer is not None and trainer.training:
            skipped = self.skips.skipped
            if skipped != getattr(self, "_logged_skips", 0):
                self._logged_skips = skipped
                if trainer.logger is not None:
                    trainer.logger.log_metrics({"data/skipped": skipped}, step=trainer.global_step)
            bad = self.train_skips.skipped
            batches = (trainer.global_step + 1) * int(getattr(trainer, "accumulate_grad_batches", 1))
            read = bad + batches * self.per_device_batch_size
            epoch = math.ceil(self.num_train_samples / max(1, self._world_size))
            if bad and bad / max(read, epoch) > self.max_skipped_fraction:
                checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", None)
                raise TrainingStopped(
                    f"{bad} of {read} training samples read so far could not be read (more than "
                    f"data.max_skipped_fraction {self.max_skipped_fraction:g} of {max(read, epoch)}, at least an "
                    f"epoch; each is in the log with its shard); check the data with `igdit data verify {self.root}`"
                    + (f"; the last checkpoint is {checkpoint}" if checkpoint else ""))
        return batch

    def state_dict(self) -> dict:
        """The stream's position, saved in checkpoints: per-device batches consumed so far (one per optimiser step
        and accumulated batch)."""
        trainer = self.trainer
        if trainer is None:
            return {}
        return {"batches": int(trainer.global_step) * int(trainer.accumulate_grad_batches)}

    def load_state_dict(self, state_dict: dict) -> None:
        """A resumed fit continues the stream where the checkpoint left it (same epoch, same batches)."""
        self._resume_batches = state_dict.get("batches")

    def _resume_point(self) -> Optional[ResumePoint]:
        if not self._resume_batches:
            return None
        point, self._resume_batches = ResumePoint(self._resume_batches, self.steps_per_epoch), None
        return point

    def train_samples(self, with_keys: bool = False, resume: Optional[ResumePoint] = None) -> wds.DataPipeline:
        """Infinite shuffled stream of (x (c, h, w) float32, y () long), or (key, x, y) with ``with_keys``,
        for the rank and worker WebDataset sees (RANK/WORLD_SIZE or torch.distributed; DataLoader worker).
        Posterior shards: x is a fresh draw from the sample's stored posterior at every read."""
        field, value = ("data.root", self.root) if self.train_shards_spec is None \
            else ("data.train_shards", self.train_shards_spec)
        return wds.DataPipeline(
            wds.SimpleShardList(self.train_urls),  # no shuffle here: all ranks must split the same list
            wds.split_by_node,  # the worker split is RepeatShards' (a resumed worker may play another's part)
            # reads the tars and shuffles raw bytes within each pass; decode only what leaves the buffer
            RepeatShards(len(self.train_urls), self.seed, field, value, self.shuffle_buffer, self._expected_node,
                         resume, self._train_skip, self.check),
            *self._decode_stages(with_keys, training=True),
        )

    def train_dataset(self) -> wds.DataPipeline:
        """Full per-device batches, steps_per_epoch of them per epoch across this rank's workers (after a resume,
        the rest of the interrupted epoch first)."""
        per_worker = self.steps_per_epoch // max(1, self.num_workers)  # each worker yields its share
        resume = self._resume_point()
        return self.train_samples(resume=resume).compose(wds.batched(self.per_device_batch_size, partial=False),
                                                         EpochOfBatches(per_worker, resume))

    def val_dataset(self, with_keys: bool = False) -> wds.DataPipeline:
        """One pass over all val shards in order: (x (B, c, h, w), y (B,)) batches, the last one partial."""
        return wds.DataPipeline(
            wds.SimpleShardList(self.val_urls),
            wds.split_by_worker,  # no split_by_node: every rank validates on the whole set
            *self._decode_stages(with_keys),
            wds.batched(self.val_batch_size or self.per_device_batch_size, partial=True),
        )

    def latent_batches(self, split: str, batch_size: int, rank: int = 0, world_size: int = 1):
        """One ordered pass over a rank's share of a split (shards rank, rank + world_size, ...), in this
        process: (x (B, c, h, w), y (B,)) batches, the last one partial. The ranks' shares are disjoint
        and together cover the split exactly once (reference statistics for the Fréchet distance)."""
        urls = (self.train_urls if split == "train" else self.val_urls)[rank::world_size]
        if not urls:  # more ranks than shards: this rank has nothing to read
            return iter(())
        return wds.DataPipeline(wds.SimpleShardList(urls), *self._decode_stages(with_keys=False),
                                wds.batched(batch_size, partial=True))

    def _loader(self, dataset) -> DataLoader:
        # batch_size=None: the pipeline already batches.
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset())

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset())
