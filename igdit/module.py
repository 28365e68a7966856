"""IGDiTModule: the LightningModule that bundles backbone, transport, loss terms and optimiser.

One training step: drop labels for CFG -> sample t and noise -> x_t and the velocity target -> one
backbone pass that computes the exits the active loss terms ask for -> weighted sum of terms.
EMA of the weights is Lightning's `EMAWeightAveraging` callback (configured in the experiment YAML); it
swaps the averaged weights in for validation and puts them into the checkpoint's `state_dict`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import lightning.pytorch as pl
import torch

from igdit.config import ConfigError, check_number
from igdit.models import build_backbone
from igdit.objectives import (DiffusionLoss, DiffusionLossConfig, ExitLoss, ExitLossConfig, LossInputs,
                              Objective)
from igdit.transport import Transport


@dataclass
class TransportConfig:
    """Path and training-time distribution of t (t = 1 is noise); see igdit.transport.Transport."""

    path: str = "linear"
    time_sampling: str = "uniform"
    lognormal_mean: float = 0.0
    lognormal_std: float = 1.0


@dataclass
class AdamWConfig:
    """AdamW as the SiT/IG code: lr 1e-4 constant, betas (0.9, 0.999), no weight decay, eps 1e-8.

    Gradient clipping is the Trainer's `gradient_clip_val` (1.0 in the shipped experiments).
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0

    def validate(self, field: str = "model.optimizer") -> None:
        check_number(f"{field}.lr", self.lr, low=0, low_inclusive=False)
        for i, beta in enumerate(self.betas):
            check_number(f"{field}.betas[{i}]", beta, low=0, high=1, high_inclusive=False)
        check_number(f"{field}.weight_decay", self.weight_decay, low=0)
        check_number(f"{field}.eps", self.eps, low=0, low_inclusive=False)
        check_number(f"{field}.warmup_steps", self.warmup_steps, low=0, integer=True)


def _as(cls, value):
    """Accept a dataclass or the plain dict stored in a checkpoint's hyper-parameters."""
    return cls(**value) if isinstance(value, dict) else (value if value is not None else cls())


class IGDiTModule(pl.LightningModule):
    """A Diffusion Transformer with Internal Guidance exit heads, trained by flow matching.

    name: backbone from the registry ("SiT-T/2", "SiT-B/2", "SiT-XL/2", ...).
    exits: 1-based block indices with an IG exit head (official: 4 for B/2, 8 for L/XL).
    input_size, in_channels, num_classes: latent side, latent channels, classes; must match the shards.
    class_dropout: probability that a label is replaced by the null label num_classes (CFG training).
    compile: torch.compile the backbone in place (parameter names unchanged).
    """

    def __init__(
        self,
        name: str = "SiT-T/2",
        exits: list[int] = [2],
        input_size: int = 8,
        in_channels: int = 1,
        num_classes: int = 10,
        qk_norm: bool = False,
        class_dropout: float = 0.1,
        transport: TransportConfig = TransportConfig(),
        diffusion_loss: DiffusionLossConfig = DiffusionLossConfig(),
        exit_loss: ExitLossConfig = ExitLossConfig(),
        optimizer: AdamWConfig = AdamWConfig(),
        compile: bool = False,
    ):
        super().__init__()
        transport, optimizer = _as(TransportConfig, transport), _as(AdamWConfig, optimizer)
        diffusion_loss, exit_loss = _as(DiffusionLossConfig, diffusion_loss), _as(ExitLossConfig, exit_loss)
        # Plain containers only in the checkpoint, so it loads with torch.load(weights_only=True).
        self.save_hyperparameters({
            "name": name, "exits": list(exits), "input_size": input_size, "in_channels": in_channels,
            "num_classes": num_classes, "qk_norm": qk_norm, "class_dropout": class_dropout,
            "transport": asdict(transport), "diffusion_loss": asdict(diffusion_loss),
            "exit_loss": asdict(exit_loss), "optimizer": asdict(optimizer), "compile": compile,
        })
        check_number("model.class_dropout", class_dropout, low=0, high=1, high_inclusive=False)
        check_number("model.input_size", input_size, low=1, integer=True)
        check_number("model.in_channels", in_channels, low=1, integer=True)
        check_number("model.num_classes", num_classes, low=1, integer=True)
        optimizer.validate()
        self.optimizer_config = optimizer
        self.class_dropout = class_dropout
        self.backbone = build_backbone(name, input_size=input_size, in_channels=in_channels,
                                       num_classes=num_classes, exits=exits, qk_norm=qk_norm)
        self.transport = Transport(**asdict(transport))
        self.objective = Objective([DiffusionLoss(diffusion_loss),
                                    ExitLoss(exit_loss, tuple(sorted(exits)))])
        self.compile_backbone = compile
        self.data_meta: Optional[dict] = None  # the shards' meta.json, kept in checkpoints for decoding

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.hparams.in_channels, self.hparams.input_size, self.hparams.input_size)

    @property
    def num_classes(self) -> int:
        return self.hparams.num_classes

    def setup(self, stage: str) -> None:
        if self.compile_backbone:
            # In place, so state-dict keys keep their names. Lightning runs callbacks' setup first, so
            # EMAWeightAveraging has already copied the (uncompiled) module it averages into.
            self.backbone.compile()
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "meta"):
            self.data_meta = datamodule.meta

    def training_flops(self, batch_size: int) -> int:
        """FLOPs of one training step's forward + backward on `batch_size` samples, counted on the meta device."""
        from lightning.fabric.utilities.throughput import measure_flops

        h = self.hparams
        with torch.device("meta"):
            model = build_backbone(h.name, input_size=h.input_size, in_channels=h.in_channels,
                                   num_classes=h.num_classes, exits=h.exits, qk_norm=h.qk_norm)
            x, t = torch.empty(batch_size, *self.latent_shape), torch.empty(batch_size)
            y = torch.zeros(batch_size, dtype=torch.long)
        exits = self.objective.exits_needed(0)
        return measure_flops(model, lambda: model(x, t, y, exits=exits),
                             lambda out: out.final.sum() + sum(v.sum() for v in out.exits.values()))

    def drop_labels(self, y: torch.Tensor) -> torch.Tensor:
        """Replace each label by the null label num_classes with probability class_dropout."""
        if self.class_dropout == 0:
            return y
        drop = torch.rand(y.shape, device=y.device) < self.class_dropout
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def compute_loss(self, x: torch.Tensor, y: torch.Tensor, step: int,
                     generator: torch.Generator | None = None):
        """x: (N, C, H, W) latents, y: (N,) labels. Returns (total loss, {term: value})."""
        t = self.transport.sample_t(x.shape[0], device=x.device, generator=generator)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        x_t, target = self.transport.interpolate(x, noise, t)
        output = self.backbone(x_t, t, y, exits=self.objective.exits_needed(step),
                               hidden=self.objective.hidden_needed(step))
        inputs = LossInputs(x=x, noise=noise, t=t, x_t=x_t, target=target, y=y, output=output, step=step)
        return self.objective(inputs)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss, terms = self.compute_loss(x, self.drop_labels(y), self.global_step)
        if not torch.isfinite(loss):
            # Stop rather than train on garbage; the last good checkpoint stays on disk.
            raise FloatingPointError(f"non-finite training loss {loss.item()} at step {self.global_step}: "
                                     + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items()))
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        # Fixed t and noise per batch: the validation loss is comparable across evaluations and runs.
        x, y = batch
        generator = torch.Generator(device=x.device).manual_seed(10_000 + batch_idx)
        loss, terms = self.compute_loss(x, y, self.global_step, generator=generator)
        n = x.shape[0]
        self.log("val/loss", loss, batch_size=n)
        self.log_dict({f"val/{k}": v for k, v in terms.items()}, batch_size=n)

    def configure_optimizers(self):
        c = self.optimizer_config
        opt = torch.optim.AdamW(self.backbone.parameters(), lr=c.lr, betas=tuple(c.betas),
                                weight_decay=c.weight_decay, eps=c.eps)
        if not c.warmup_steps:
            return opt
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / c.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.data_meta is not None:
            checkpoint["igdit_data_meta"] = self.data_meta

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.data_meta = checkpoint.get("igdit_data_meta")
