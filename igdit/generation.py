"""Generating images from a model: labels, per-sample noise, batches, the share of each rank, decoding.

One code path for `igdit sample`, the FIDCallback, `igdit eval`, sweeps and the end-of-run grid. Every sample i
draws its noise from its own generator seeded with (seed, i), edm2's practice: an image does not depend on the
batch size or on how many ranks generate. Under several ranks each generates the indices i = rank (mod world).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Optional

import numpy as np
import torch
from tqdm import tqdm
from jsonargparse.typing import PositiveFloat, PositiveInt

from igdit.config import ConfigError
from igdit.data.encoders import decode_latents
from igdit.guidance import Denoiser, GuidanceRule
from igdit.images import to_uint8
from igdit.samplers import check_sampling, run_sampler



@dataclass
class Sampling:
    """How samples are drawn: the sampler, its number of steps and time grid (t = 1 noise).

    sampler: "sde" (Euler–Maruyama, the SiT paper's evaluation), "euler" or "heun" (ODE): a name in
        ``igdit.samplers.SAMPLERS`` or the import path of a ``SamplerEntry``.
    schedule: the time grid (default: the sampler's; uniform for euler/heun, the sde grid for sde): a name in
        ``igdit.samplers.SCHEDULES`` ("uniform", "sde", "shifted": with ``shift``, LightningDiT's time shift) or
        the import path of a grid function. heun_last_step: "euler" (SiT) or "heun" (LightningDiT's heun2).
    heun_decide: when guidance rules decide whether they act in a Heun step: once at its start ("step", the
        public SiT sampler) or at each evaluation's own time ("evaluation", LightningDiT's heun2).
    """

    sampler: str = "sde"
    steps: PositiveInt = 250
    schedule: Optional[str] = None
    shift: PositiveFloat = 0.3
    heun_last_step: Literal["euler", "heun"] = "euler"
    heun_decide: Literal["step", "evaluation"] = "step"

    def __post_init__(self) -> None:
        check_sampling(self.sampler, self.steps, self.schedule)

    @classmethod
    def checked(cls, prefix: str, *args, **kwargs) -> "Sampling":
        """A Sampling whose errors name its fields as ``<prefix><field>`` (a callback's or a command's own)."""
        try:
            return cls(*args, **kwargs)
        except ConfigError as err:
            raise ConfigError(f"{prefix}{err.field}", err.value, err.allowed) from None

    def describe(self) -> dict:
        return {"sampler": self.sampler, "steps": self.steps, "schedule": self.schedule or "default",
                **({"shift": self.shift} if self.schedule == "shifted" else {}),
                **({"heun_last_step": self.heun_last_step, "heun_decide": self.heun_decide}
                   if self.sampler == "heun" else {})}


def class_labels(num: int, num_classes: int, mode: str, seed: int, field: str = "--num") -> torch.Tensor:
    """(num,) labels: uniformly random, or class-balanced (exactly num / num_classes per class, shuffled)."""
    generator = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.randint(0, num_classes, (num,), generator=generator)
    if num % num_classes:
        raise ConfigError(field, num, f"labels: balanced needs a multiple of the {num_classes} classes")
    labels = torch.arange(num_classes).repeat_interleave(num // num_classes)
    return labels[torch.randperm(num, generator=generator)]


def rank_indices(num: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The sample indices rank ``rank`` of ``world_size`` generates: rank, rank + world_size, ..."""
    return list(range(rank, num, world_size))


class PerSampleNoise:
    """Gaussian noise from one generator per sample, seeded with (seed, sample index).

    Each call returns the next (n, *shape) draw: the first is the starting noise, later ones an SDE's
    step noise, so a sample's whole trajectory depends only on its own index.
    """

    def __init__(self, indices: list[int], seed: int, shape: tuple[int, ...], device="cpu"):
        self.generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in indices]
        self.shape, self.device = shape, device

    def __call__(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device)


def to_nhwc_rgb(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) uint8 with C in {1, 3} -> (N, H, W, 3) uint8 numpy (grey is repeated)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.permute(0, 2, 3, 1).contiguous().numpy()


@torch.no_grad()
def image_batches(module, denoiser: Denoiser, sampling: Sampling, indices: list[int], labels: torch.Tensor,
                  seed: int, batch_size: int, progress: bool = True,
                  desc: str = "sampling") -> Iterator[tuple[torch.Tensor, int]]:
    """Generate the samples ``indices`` (labels: theirs, (len(indices),)) batch by batch.

    Yields (uint8 images (B, C, H, W) on the model's device, decoded with the module's shard metadata, NFE per
    sample of that batch). Only one batch is held at a time, so callers can stream thousands of images.
    """
    parameter = next(module.backbone.parameters())
    starts = range(0, len(indices), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        batch_indices = indices[start:start + batch_size]
        noise = PerSampleNoise(batch_indices, seed, module.latent_shape, parameter.device)
        x0, nfe = run_sampler(sampling.sampler, denoiser, module.transport, noise(),
                              labels[start:start + batch_size].to(parameter.device), sampling.steps,
                              model_dtype=parameter.dtype, step_noise=noise, schedule=sampling.schedule,
                              shift=sampling.shift, heun_last_step=sampling.heun_last_step,
                              decide=sampling.heun_decide)
        yield to_uint8(decode_latents(x0.float(), module.data_meta)), nfe


def generate(module, rules: list[GuidanceRule], sampling: Sampling, indices: list[int], labels: torch.Tensor,
             seed: int, batch_size: int, progress: bool = True) -> tuple[np.ndarray, int, Denoiser]:
    """Generate the samples ``indices`` (labels: theirs). Returns (N x H x W x 3 uint8, NFE per sample, the
    denoiser, whose counters hold the network cost)."""
    denoiser = Denoiser(module.backbone, rules)
    chunks, nfe = [], 0
    for images, nfe in image_batches(module, denoiser, sampling, indices, labels, seed, batch_size, progress):
        chunks.append(to_nhwc_rgb(images.cpu()))
    return np.concatenate(chunks), nfe, denoiser


class _CountedEvaluations:
    """A denoiser that moves a progress bar by one per evaluation (samplers call ``denoiser(x, t, y, decide_at=)``)."""

    def __init__(self, denoiser: Denoiser, bar):
        self.denoiser, self.bar = denoiser, bar

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        out = self.denoiser(*args, **kwargs)
        self.bar.update(1)
        return out


@torch.no_grad()
def class_grid(module, samples_per_class: int, sampling: Sampling, settings: list[list[GuidanceRule]],
               seed: int = 0, progress: bool = False) -> list[torch.Tensor]:
    """The same noise for every class under each guidance setting: one (num_classes, samples_per_class, C, H, W)
    uint8 block per setting (the end-of-run grid: e.g. the final head alone, then with Internal Guidance). All classes
    are one batch per setting, so ``progress`` counts the sampler's network evaluations."""
    k, n_cls = samples_per_class, module.num_classes
    labels = torch.arange(n_cls).repeat_interleave(k)
    was_training = module.backbone.training
    module.backbone.eval()
    blocks = []
    evaluations = sampling.steps * (2 if sampling.sampler == "heun" else 1)  # Heun: at most two per step
    with tqdm(total=len(settings) * evaluations, desc=f"sample grid ({n_cls} classes x {k}, {len(settings)} "
              "settings)", unit="NFE", disable=not progress, leave=False) as bar:
        for rules in settings:
            denoiser = _CountedEvaluations(Denoiser(module.backbone, rules), bar)
            images = torch.cat([batch.cpu() for batch, _ in image_batches(
                module, denoiser, sampling, list(range(n_cls * k)), labels, seed, n_cls * k, progress=False)])
            blocks.append(images.reshape(n_cls, k, *images.shape[1:]))
    module.backbone.train(was_training)
    return blocks
