"""Scoring image streams: one Fréchet metric (and the Inception Score on Inception features) against
reference statistics computed once per data set and feature network, then cached beside the shards.

Used by the FIDCallback during training, by `igdit eval` offline, and by sampling sweeps: one code path.
Every rank streams its own share of the images; torchmetrics sums the feature statistics across ranks
when it computes, so the result does not depend on the number of ranks.
"""
from __future__ import annotations

import hashlib
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from tqdm import tqdm
from torchmetrics.image.inception import InceptionScore

from igdit.config import ConfigError
from igdit.data.cache import data_fingerprint, reference_dir
from igdit.data.encoders import decode_latents
from igdit.generation import Sampling, class_labels, image_batches, rank_indices
from igdit.guidance import Denoiser
from igdit.images import to_uint8
from igdit.metrics.features import METRIC_NAMES, LastLogits, build_feature_net, digits_feature_net
from igdit.metrics.fid import ReferenceStats, load_reference, new_frechet_metric, reference_from_metric

REFERENCE_SPLITS = ("train", "val")


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def real_image_batches(datamodule, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                       max_samples: Optional[int] = None) -> Iterator[torch.Tensor]:
    """uint8 images (B, C, H, W) of this rank's share of a split's shards, decoded with the shards' own
    encoder and normaliser; at most ceil(max_samples / world_size) of them on each rank."""
    limit = None if max_samples is None else -(-max_samples // world_size)
    seen = 0
    for latents, _ in datamodule.latent_batches(split, batch_size, rank, world_size):
        if limit is not None:
            latents = latents[: limit - seen]
        seen += latents.shape[0]
        if latents.shape[0]:
            yield to_uint8(decode_latents(latents, datamodule.meta))
        if limit is not None and seen >= limit:
            return


class FrechetEvaluator:
    """Fréchet distance (and IS on Inception features) of generated image streams against a reference.

    feature: "digits" (metric ``fd_digits``, a network trained on the data set's own images) or "inception" (``fid``).
    datamodule: the shards (for the digits network and for train/val references).
    inception_score: also compute the Inception Score (Inception features only).
    """

    def __init__(self, feature: str, datamodule=None, inception_weights: Optional[str] = None,
                 allow_download: bool = False, inception_score: bool = True, field: str = "feature",
                 weights_field: str = "inception_weights"):
        self.feature = feature
        digits = None if datamodule is None else (
            lambda: digits_feature_net(datamodule, reference_dir(datamodule), data_fingerprint(datamodule)))
        self.net = build_feature_net(feature, inception_weights, allow_download, field, weights_field, digits)
        self.metric_name = METRIC_NAMES[feature]
        self.num_features = int(self.net.num_features)
        self.fid = new_frechet_metric(self.net)
        self.inception_score = (InceptionScore(feature=LastLogits(self.net))
                                if feature == "inception" and inception_score else None)
        self.reference: Optional[ReferenceStats] = None

    def to(self, device) -> "FrechetEvaluator":
        self.fid.to(device)
        if self.inception_score is not None:
            self.inception_score.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.fid.real_features_sum.device

    # ---- reference ---------------------------------------------------------------------------------
    def use_reference(self, stats: ReferenceStats) -> None:
        """Fixed reference statistics (loaded from a file or computed earlier)."""
        self.reference = stats
        load_reference(self.fid, stats, rank=_dist()[0])

    def stream_reference(self, batches: Iterable[torch.Tensor]) -> ReferenceStats:
        """Stream this rank's share of the real images; returns the statistics of all ranks' images."""
        for images in batches:
            self.fid.update(images.to(self.device), real=True)
        self.reference = reference_from_metric(self.fid, self.feature)
        return self.reference

    def reference_from_data(self, datamodule, split: str, batch_size: int = 500,
                            max_samples: Optional[int] = None, cache: bool = True) -> ReferenceStats:
        """Reference statistics of a split's images, cached as ``<root>/fid_refs/<feature>-<split>-<n>-<id>.npz``
        (the id hashes the shard list and the feature network, so a change is never mixed up with a cache)."""
        path = self._cache_path(datamodule, split, max_samples)
        if cache and path.is_file():
            stats = ReferenceStats.load(path, self.num_features, self.feature, field="reference cache")
            self.use_reference(stats)
            return stats
        rank, world = _dist()
        batches = real_image_batches(datamodule, split, batch_size, rank, world, max_samples)
        stats = self.stream_reference(tqdm(batches, desc=f"reference statistics ({split})", unit="batch",
                                           disable=rank != 0, leave=False))
        if cache and rank == 0:
            try:
                stats.save(path)
            except FileExistsError:  # another process wrote it meanwhile; ours is the same
                pass
            except OSError as err:
                warnings.warn(f"could not cache the reference statistics at {path} ({err}); they will be "
                              "recomputed next time", stacklevel=2)
        return stats

    def _cache_path(self, datamodule, split: str, max_samples: Optional[int]) -> Path:
        digest = hashlib.sha256(f"{data_fingerprint(datamodule, split)}-{self._net_fingerprint()}".encode()).hexdigest()
        count = "all" if max_samples is None else str(max_samples)
        return reference_dir(datamodule) / f"{self.feature}-{split}-{count}-{digest[:12]}.npz"

    def _net_fingerprint(self) -> str:
        digest = hashlib.sha256(type(self.net).__name__.encode())
        for tensor in self.net.state_dict().values():
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    # ---- scoring -----------------------------------------------------------------------------------
    def score(self, batches: Iterable[torch.Tensor]) -> dict[str, float]:
        """Stream generated uint8 images (B, C, H, W); returns {"fd": distance, "num_samples": n over all
        ranks, and "is"/"is_std" with the Inception Score}. The real statistics stay; the generated ones are
        reset first, so a score never mixes in an earlier (or interrupted) one."""
        if self.reference is None:
            raise RuntimeError("set the reference statistics first (use_reference / reference_from_data)")
        self.fid.reset()
        if self.inception_score is not None:
            self.inception_score.reset()
        for images in batches:
            images = images.to(self.device)
            self.fid.update(images, real=False)
            if self.inception_score is not None:
                self.inception_score.update(images)
        count = self.fid.fake_features_num_samples.clone()
        if _dist()[1] > 1:
            torch.distributed.all_reduce(count)
        result = {"fd": float(self.fid.compute()), "num_samples": int(count)}
        if self.inception_score is not None:
            mean, std = self.inception_score.compute()
            result["is"], result["is_std"] = float(mean), float(std)
        return result


def check_reference(reference: str, field: str) -> str:
    """``train``, ``val`` or the path of an .npz with mu and sigma."""
    if not isinstance(reference, str) or not reference:
        raise ConfigError(field, reference, "expected 'train', 'val' or the path of a reference .npz (mu, sigma)")
    if reference not in REFERENCE_SPLITS and not reference.endswith(".npz"):
        raise ConfigError(field, reference, "expected 'train', 'val' or the path of a reference .npz (mu, sigma)")
    return reference


def evaluate_settings(module, settings: dict, evaluator: FrechetEvaluator, num_samples: int, sampling: Sampling,
                      labels: str = "balanced", seed: int = 0, batch_size: int = 250,
                      grid_size: int = 100, progress: bool = False) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Generate ``num_samples`` images per guidance setting and score each against the evaluator's reference.

    module: an IGDiTModule (backbone, transport, latent_shape, num_classes, data_meta); settings: name -> a list
    of guidance rules. Every setting starts from the same per-sample noise and labels (seeded by ``seed``), and
    this rank generates the samples rank, rank + world, ..., so the result does not depend on the rank count.
    Returns ({name: {"fd", "num_samples", "nfe", "cost", "seconds"[, "is", "is_std"]}}, {name: first <= grid_size
    images of this rank, uint8 (n, C, H, W) on the CPU}).
    """
    rank, world = _dist()
    all_labels = class_labels(num_samples, module.num_classes, labels, seed)
    indices = rank_indices(num_samples, rank, world)
    results, grids = {}, {}
    was_training = module.training
    module.eval()
    try:
        for name, rules in settings.items():
            denoiser = Denoiser(module.backbone, rules)
            kept, nfe = [], 0

            def stream():
                nonlocal nfe
                held = 0
                for images, nfe in image_batches(module, denoiser, sampling, indices, all_labels[indices], seed,
                                                 batch_size, progress, desc=f"samples for {name}"):
                    if held < grid_size:
                        kept.append(images[: grid_size - held].cpu())
                        held += kept[-1].shape[0]
                    yield images

            start = time.perf_counter()
            results[name] = evaluator.score(stream()) | {"nfe": nfe, "seconds": time.perf_counter() - start}
            # network rows pushed per sample and step: 1 unguided, 2 for CFG on every step, 1 + guide for AG
            results[name]["cost"] = denoiser.network_rows / max(len(indices) * nfe, 1)
            grids[name] = torch.cat(kept) if kept else torch.empty(0, dtype=torch.uint8)
    finally:
        module.train(was_training)
    return results, grids
