"""Fréchet distance on torchmetrics' ``FrechetInceptionDistance``, with reference statistics.

The metric keeps float64 running sums of features and of their outer products, summed across ranks when
it syncs. Reference (real) statistics are either streamed through it once or loaded from a file holding
(n, mu, sigma) — the ADM suite's reference batches hold mu and sigma — by filling the real-side sums on
rank 0 only (the sums are added across ranks). ``reset_real_features=False`` keeps them across evaluations,
so each evaluation only streams generated images, batch by batch: memory does not grow with K.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn
from torchmetrics.image.fid import FrechetInceptionDistance

from igdit.config import ConfigError


@dataclass
class ReferenceStats:
    """Feature statistics of the real images: n samples, mean mu (F,), covariance sigma (F, F) (unbiased).

    feature names the feature network that produced them (``digits`` or ``inception``), so statistics of
    one network are never compared with features of another.
    """

    n: int
    mu: np.ndarray
    sigma: np.ndarray
    feature: str

    def save(self, path: str | os.PathLike) -> Path:
        """Write an .npz (``mu``, ``sigma``, ``n``, ``feature``); never replaces an existing file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "xb") as handle:
            np.savez(handle, mu=self.mu, sigma=self.sigma, n=np.int64(self.n), feature=np.str_(self.feature))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, num_features: int, feature: str, field: str = "reference") -> "ReferenceStats":
        """Read and check an .npz with ``mu`` (F,) and ``sigma`` (F, F); ``n`` and ``feature`` are optional
        (the ADM suite's files have neither: n only scales the sums and cancels, so 50,000 is assumed)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(field, str(path), "is not a file; pass a reference .npz with mu and sigma, or train/val")
        try:
            data = np.load(path)
            mu, sigma = np.asarray(data["mu"], dtype=np.float64), np.asarray(data["sigma"], dtype=np.float64)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(field, str(path), f"could not be read as an .npz with mu and sigma ({err!r})") from None
        if mu.shape != (num_features,) or sigma.shape != (num_features, num_features):
            raise ConfigError(field, str(path), f"holds mu {mu.shape} and sigma {sigma.shape}; the {feature} "
                              f"features need mu ({num_features},) and sigma ({num_features}, {num_features})")
        stored = str(data["feature"]) if "feature" in data else feature
        if stored != feature:
            raise ConfigError(field, str(path), f"holds statistics of {stored!r} features, not {feature!r}")
        n = int(data["n"]) if "n" in data else 50_000
        return cls(n=n, mu=mu, sigma=sigma, feature=feature)


def check_reference_file(path: str | os.PathLike, feature: str, field: str = "reference") -> None:
    """What can be checked of a reference .npz without its feature network: it is a file with mu (F,) and a square
    sigma (F, F) of ``feature``'s statistics (``ReferenceStats.load`` checks F once the network is built)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(field, str(path), "is not a file; pass a reference .npz with mu and sigma, or train/val")
    try:
        data = np.load(path)
        mu, sigma = data["mu"], data["sigma"]
    except Exception as err:  # any file that is not an .npz with those arrays
        raise ConfigError(field, str(path), f"could not be read as an .npz with mu and sigma ({type(err).__name__}: "
                                            f"{' '.join(str(err).split())[:120]})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ConfigError(field, str(path), f"holds mu {mu.shape} and sigma {sigma.shape}; expected mu (F,) and "
                                            "sigma (F, F)")
    stored = str(data["feature"]) if "feature" in data else feature
    if stored != feature:
        raise ConfigError(field, str(path), f"holds statistics of {stored!r} features, not {feature!r}")


def new_frechet_metric(feature_net: nn.Module) -> FrechetInceptionDistance:
    """A Fréchet distance metric on ``feature_net`` (uint8 images in, (N, F) features out) that keeps
    its real statistics across ``reset()``."""
    return FrechetInceptionDistance(feature=feature_net, reset_real_features=False, normalize=False)


def load_reference(metric: FrechetInceptionDistance, stats: ReferenceStats, rank: int = 0) -> None:
    """Put (n, mu, sigma) into the metric's real-side sums on rank 0 (other ranks hold zeros, and the
    sums are added across ranks): sum = n mu, sum of outer products = (n - 1) sigma + n mu mu^T."""
    device = metric.real_features_sum.device
    mu = torch.as_tensor(stats.mu, dtype=torch.float64, device=device)
    sigma = torch.as_tensor(stats.sigma, dtype=torch.float64, device=device)
    n = stats.n if rank == 0 else 0
    metric.real_features_sum = n * mu
    metric.real_features_cov_sum = (n - 1) * sigma + n * torch.outer(mu, mu) if n else torch.zeros_like(sigma)
    metric.real_features_num_samples = torch.tensor(n, dtype=torch.long, device=device)


def reference_from_metric(metric: FrechetInceptionDistance, feature: str) -> ReferenceStats:
    """(n, mu, sigma) of the real images streamed into ``metric`` on all ranks (synced if distributed)."""
    with metric.sync_context(should_sync=torch.distributed.is_available() and torch.distributed.is_initialized()):
        n = int(metric.real_features_num_samples)
        total, outer = metric.real_features_sum.double(), metric.real_features_cov_sum.double()
    if n < 2:
        raise ValueError(f"the reference holds {n} image(s); a Fréchet distance needs at least 2")
    mu = total / n
    sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)
    return ReferenceStats(n=n, mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy(), feature=feature)


def warn_if_singular(num_samples: int, num_features: int, what: str) -> None:
    """One warning when fewer samples than feature dimensions make the covariance singular."""
    if num_samples <= num_features:
        warnings.warn(f"{what}: {num_samples} samples for {num_features}-dimensional features; the covariance is "
                      f"singular and the Fréchet distance unreliable (use more than {num_features})", stacklevel=2)


def frechet_distance(feature_net: nn.Module, real: Iterable[torch.Tensor] | ReferenceStats,
                     fake: Iterable[torch.Tensor], feature: str) -> float:
    """Fréchet distance between two streams of uint8 image batches (N, C, H, W), or reference statistics
    and a stream. A plain helper for tests and offline scoring; the callback keeps one metric instead."""
    metric = new_frechet_metric(feature_net)
    if isinstance(real, ReferenceStats):
        load_reference(metric, real)
    else:
        for batch in real:
            metric.update(batch, real=True)
    for batch in fake:
        metric.update(batch, real=False)
    return float(metric.compute())
