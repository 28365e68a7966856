"""Lightning callbacks: the end-of-run sample grid and training throughput."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.loggers import MLFlowLogger

from igdit.config import check_number
from igdit.guidance import Denoiser, GuidanceRule
from igdit.images import image_grid, save_png, to_uint8
from igdit.samplers import euler_ode
from igdit.tracking import run_directory


class SamplesThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor for (latents, labels) batches: logs train/samples_per_sec and friends."""

    def __init__(self, window_size: int = 20):
        super().__init__(batch_size_fn=lambda batch: batch[0].shape[0], window_size=window_size)

    def setup(self, trainer, pl_module, stage: str) -> None:
        # FLOPs per batch (counted once on the meta device) let Lightning report flops_per_sec and MFU.
        batch = getattr(trainer.datamodule, "per_device_batch_size", None) if trainer.datamodule else None
        if batch and hasattr(pl_module, "training_flops") and not hasattr(pl_module, "flops_per_batch"):
            pl_module.flops_per_batch = pl_module.training_flops(batch)
        super().setup(trainer, pl_module, stage)


def decode_latents(latents: torch.Tensor, meta: Optional[dict]) -> torch.Tensor:
    """(N, c, h, w) normalised latents -> (N, C, H, W) images in [-1, 1], with the shards' own normaliser
    and encoder (identity for pixel-space data; SD-VAE later), so encode and decode cannot disagree."""
    if meta is None:
        return latents
    from igdit.data.encoders import LatentNormalizer, build_encoder

    normalizer = LatentNormalizer.from_dict(meta["normalizer"])
    encoder = build_encoder(meta["encoder"])  # the whole description: name, weights folder, latent mode
    return encoder.decode(normalizer.denormalize(latents))


@torch.no_grad()
def sample_class_grid(module, samples_per_class: int, steps: int, ig_scale: float, seed: int = 0):
    """Generate the same noise for every class twice: final head alone, and with Internal Guidance.

    Returns (without_ig, with_ig, nfe), each (num_classes, samples_per_class, C, H, W) uint8.
    """
    backbone = module.backbone
    k, n_cls = samples_per_class, module.num_classes
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((n_cls * k, *module.latent_shape), generator=generator).to(module.device)
    labels = torch.arange(n_cls, device=module.device).repeat_interleave(k)
    dtype = next(backbone.parameters()).dtype
    was_training = backbone.training
    backbone.eval()
    results, nfe = [], 0
    for scale in (1.0, ig_scale):
        denoiser = Denoiser(backbone, ig=GuidanceRule(scale=scale))
        latents, n = euler_ode(denoiser, noise, labels, steps=steps, model_dtype=dtype)
        nfe += n
        images = to_uint8(decode_latents(latents.float().cpu(), module.data_meta))
        results.append(images.reshape(n_cls, k, *images.shape[1:]))
    backbone.train(was_training)
    return results[0], results[1], nfe


class SampleGrid(pl.Callback):
    """At the end of fit, samples one row per class with and without Internal Guidance (same noise).

    Runs after EMAWeightAveraging has copied the averaged weights into the model, so the grid shows the
    EMA weights. The PNG goes into the run folder and into the MLflow run's artifacts.
    samples_per_class: images per class on each side; steps: Euler steps; ig_scale: w of the IG side.
    """

    def __init__(self, samples_per_class: int = 8, steps: int = 50, ig_scale: float = 2.0, seed: int = 0,
                 filename: str = "samples.png"):
        self.samples_per_class = check_number("SampleGrid.samples_per_class", samples_per_class, low=1, integer=True)
        self.steps = check_number("SampleGrid.steps", steps, low=1, integer=True)
        self.ig_scale = check_number("SampleGrid.ig_scale", ig_scale, low=0)
        self.seed, self.filename = seed, filename
        self.path: Optional[Path] = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if not pl_module.backbone.exit_indices and self.ig_scale != 1.0:
            raise ValueError("SampleGrid.ig_scale needs an exit head; model.exits is empty")

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        plain, guided, _ = sample_class_grid(pl_module, self.samples_per_class, self.steps, self.ig_scale, self.seed)
        self.path = save_png(image_grid([plain, guided]), run_directory(trainer) / self.filename)
        logger = trainer.logger
        if isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(self.path))
