"""IGDiTModule: the LightningModule that bundles a backbone, the loss terms, the transport and the optimiser.

Every part is injected from the experiment YAML (``class_path`` / ``init_args``, docs/design.md, contract 3):

    model:
      backbone: {class_path: igdit.models.SiT, init_args: {size: T/2, exits: [2], input_size: 8, ...}}
      terms:
        diffusion: {class_path: igdit.objectives.DiffusionLoss}
        ig_exit: {class_path: igdit.objectives.ExitLoss, init_args: {weight: 0.5}}
      optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 1.0e-4, weight_decay: 0.0}}
      lr_scheduler: {class_path: igdit.optim.LinearWarmup, init_args: {warmup_steps: 100}}

One training step: drop labels for CFG -> sample t and noise -> x_t and the velocity target -> one backbone
pass that computes the exits and hidden states the active terms ask for -> weighted sum of terms.
EMA of the weights is Lightning's `EMAWeightAveraging` callback (configured in the experiment YAML); it
averages every trained parameter (the backbone's and the terms' own), swaps the averaged weights in for
validation and puts them into the checkpoint's `state_dict`. Terms whose teacher is the EMA model (SRA) read
those averaged weights through ``LossInputs.ema_backbone``; no second EMA is kept.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from jsonargparse.typing import ClosedUnitInterval, PositiveFloat
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from igdit.compat import averaged_model, given_hyperparameters, mlflow_experiment_name
from igdit.config import ConfigError, TrainingStopped, config_parser, instantiate, plain_config
from igdit.models import Backbone
from igdit.objectives import DiffusionLoss, ExitLoss, LossInputs, LossTerm, Objective
from igdit.transport import PATHS, TIME_SAMPLINGS, Transport


@dataclass
class TransportConfig:
    """Path and training-time distribution of t (t = 1 is noise); see igdit.transport.Transport."""

    path: Literal[tuple(PATHS)] = "linear"
    time_sampling: Literal[TIME_SAMPLINGS] = "uniform"
    lognormal_mean: float = 0.0
    lognormal_std: PositiveFloat = 1.0


def default_terms(backbone: Backbone) -> dict[str, LossTerm]:
    """The IG paper's objective: the diffusion loss, plus the exit loss (lambda 0.5) when the backbone has exits."""
    terms: dict[str, LossTerm] = {"diffusion": DiffusionLoss()}
    if backbone.exit_indices:
        terms["ig_exit"] = ExitLoss()
    return terms


class IGDiTModule(pl.LightningModule):
    """A Diffusion Transformer trained by flow matching on a weighted sum of loss terms.

    backbone: a registered family and size (``igdit.models.SiT``, ``size: XL/2``) with its options.
    terms: loss terms by name (``model.terms.<name>``, logged as ``train/<name>``); default: the diffusion
        loss plus the IG exit loss when the backbone has exit heads.
    optimizer: any torch optimiser by class_path (its init_args without the parameters); it receives the
        backbone's and the terms' trainable parameters.
    lr_scheduler: optional, stepped after every optimiser step (e.g. ``igdit.optim.LinearWarmup``).
    class_dropout: probability that a label is replaced by the null label num_classes (CFG training).
    compile: torch.compile the backbone in place (parameter names unchanged).
    """

    def __init__(
        self,
        backbone: Backbone,
        terms: Optional[dict[str, LossTerm]] = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        class_dropout: ClosedUnitInterval = 0.1,
        transport: TransportConfig = TransportConfig(),
        compile: bool = False,
    ):
        super().__init__()
        # Built from a config (the CLI, build_module, load_from_checkpoint), the hyper-parameters are that config:
        # class_path dicts and plain values, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters()
        if class_dropout >= 1:
            raise ConfigError("model.class_dropout", class_dropout, "expected a probability < 1")
        self.backbone = backbone
        self.objective = Objective(default_terms(backbone) if terms is None else terms)
        transport = TransportConfig(**transport) if isinstance(transport, dict) else transport
        self.transport = Transport(**asdict(transport))
        self.objective.attach(backbone, self.transport)
        self.optimizer_factory = SharedOnCopy(optimizer)
        self.lr_scheduler_factory = None if lr_scheduler is None else SharedOnCopy(lr_scheduler)
        self.class_dropout = float(class_dropout)
        self.compile_backbone = compile
        self.data_meta: Optional[dict] = None  # the shards' meta.json, kept in checkpoints for decoding
        # Training draws (label dropout, t, noise) come from a generator of their own, saved in checkpoints: a
        # resumed run draws what the uninterrupted one would have, whatever else consumed the global RNG.
        self.train_generator: Optional[torch.Generator] = None
        self._generator_state: Optional[torch.Tensor] = None
        self._frozen_loaded = False

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.backbone.latent_shape

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    def setup(self, stage: str) -> None:
        if self.compile_backbone:
            # In place, so state-dict keys keep their names. Lightning runs callbacks' setup first, so
            # EMAWeightAveraging has already copied the (uncompiled) module it averages into.
            self.backbone.compile()
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "meta"):
            self.data_meta = datamodule.meta
        if stage == "fit":
            # Seeded from the global seed (seed_everything) and the rank: ranks draw different t and noise.
            seed = (torch.initial_seed() + 7919 * self.global_rank) % 2**63
            self.train_generator = torch.Generator(device=self.device).manual_seed(seed)
            if self._generator_state is not None:
                self.train_generator.set_state(self._generator_state)
            for term in self.objective.values():
                if term.reads_ema and term.weight > 0 and self._averaging() is None:
                    raise ConfigError(f"model.terms.{term.name}", type(term).__name__,
                                      "its teacher is the EMA model: add "
                                      "lightning.pytorch.callbacks.EMAWeightAveraging to trainer.callbacks")
            self.load_frozen_networks(datamodule)
            frozen = {f"{term.name}.{key}": value for term in self.objective.values()
                      for key, value in term.frozen_networks().items()}
            if frozen:  # what the frozen networks were loaded from, in place of their weights
                self.hparams["frozen_networks"] = frozen
                if self._trainer is not None and self.logger is not None:  # Lightning logs hparams as first saved
                    self.logger.log_hyperparams({"frozen_networks": frozen})

    def load_frozen_networks(self, datamodule=None) -> None:
        """Every term's setup, once: load and check what it reads from disk (a stage-1 teacher, an encoder's weights).
        `igdit fit` calls it before the run is created, so a teacher that is unreadable or does not fit is refused
        before anything is written; ``setup`` calls it on every other path (a sweep trial, ``igdit validate``)."""
        if self._frozen_loaded:
            return
        for term in self.objective.values():
            term.setup(self.device, datamodule)
        self._frozen_loaded = True

    def _averaging(self) -> Optional[WeightAveraging]:
        """The trainer's weight-averaging callback (EMAWeightAveraging), if any."""
        if self._trainer is None:
            return None
        return next((cb for cb in self.trainer.callbacks if isinstance(cb, WeightAveraging)), None)

    @property
    def ema_backbone(self) -> Optional[Backbone]:
        """The backbone with the EMA weights that Lightning's EMAWeightAveraging keeps; None outside a trainer or
        without that callback. While training it is the callback's averaged copy (read, never trained). During
        validation the callback has swapped the averaged weights into this module, and under ``validate`` the
        checkpoint's state_dict (the EMA weights) was loaded into it: then it is this module's own backbone."""
        averaging = self._averaging()
        if averaging is None:
            return None
        if self.trainer.training:
            average = averaged_model(averaging)  # torch AveragedModel around a deep copy of this module
            return None if average is None else average.module.backbone
        return self.backbone

    def training_flops(self, batch_size: int) -> int:
        """FLOPs of one training step's forward + backward on `batch_size` samples, counted on the meta device."""
        config = self.hparams.get("backbone")
        with torch.device("meta"):
            model = instantiate(Backbone, config) if isinstance(config, dict) else copy.deepcopy(self.backbone).to("meta")
            x, t = torch.empty(batch_size, *self.latent_shape), torch.empty(batch_size)
            y = torch.zeros(batch_size, dtype=torch.long)
        exits, hidden = self.objective.exits_needed(0), self.objective.hidden_needed(0)
        return measure_flops(model, lambda: model(x, t, y, exits=exits, hidden=hidden),
                             lambda out: out.final.sum() + sum(v.sum() for v in out.exits.values()))

    def drop_labels(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each label by the null label num_classes with probability class_dropout."""
        if self.class_dropout == 0:
            return y
        drop = torch.rand(y.shape, device=y.device, generator=generator) < self.class_dropout
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def compute_loss(self, x: torch.Tensor, y: torch.Tensor, step: int, generator: torch.Generator | None = None,
                     y_clean: torch.Tensor | None = None):
        """x: (N, C, H, W) latents, y: (N,) labels the backbone sees, y_clean: before class dropout (default y).

        Returns (total loss, {term: value})."""
        t = self.transport.sample_t(x.shape[0], device=x.device, generator=generator)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        x_t, target = self.transport.interpolate(x, noise, t)
        output = self.backbone(x_t, t, y, exits=self.objective.exits_needed(step),
                               hidden=self.objective.hidden_needed(step))
        inputs = LossInputs(x=x, noise=noise, t=t, x_t=x_t, target=target, y=y,
                            y_clean=y if y_clean is None else y_clean, output=output, step=step,
                            backbone=self.backbone, transport=self.transport, ema_backbone=self.ema_backbone,
                            data_meta=self.data_meta, generator=generator)
        return self.objective(inputs)

    def training_step(self, batch, batch_idx):
        x, y = batch
        generator = self.train_generator
        loss, terms = self.compute_loss(x, self.drop_labels(y, generator), self.global_step, generator, y_clean=y)
        if not torch.isfinite(loss):
            # Stop before the weights are touched; the last good checkpoint stays on disk.
            checkpoint = getattr(self.trainer.checkpoint_callback, "last_model_path", None)
            raise TrainingStopped(f"non-finite training loss {loss.item()} at step {self.global_step} ("
                                  + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items()) + "); "
                                  + (f"the last good checkpoint is {checkpoint}" if checkpoint
                                     else "no checkpoint was written yet"))
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
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        if self.lr_scheduler_factory is None:
            return optimizer
        # Diffusion training counts steps, not epochs: the schedule advances with every optimiser step.
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.data_meta is not None:
            checkpoint["igdit_data_meta"] = self.data_meta
        if self.train_generator is not None:
            checkpoint["igdit_train_generator"] = self.train_generator.get_state()
        run_id = getattr(self.logger, "run_id", None) if self._trainer is not None else None
        if run_id is not None:  # which run the checkpoint belongs to: `--ckpt_path <file>` resumes that run
            checkpoint["igdit_run"] = {"run_id": run_id, "experiment": mlflow_experiment_name(self.logger)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.data_meta = checkpoint.get("igdit_data_meta")
        self._generator_state = checkpoint.get("igdit_train_generator")
        if self.train_generator is not None and self._generator_state is not None:
            self.train_generator.set_state(self._generator_state)


class SharedOnCopy:
    """A callable (the optimiser or LR-scheduler factory) that a deep copy of the module shares instead of copying.

    EMAWeightAveraging deep-copies the whole module. The Lightning CLI's factories are partials holding its
    instantiator, which reaches the CLI, its trainer and, under Lightning's own DDP launcher (``trainer.devices 2``
    without torchrun), the launcher's child processes and their locks: the copy failed with "cannot pickle
    '_thread.lock' object". A factory holds no state to average, so the copy may share it."""

    def __init__(self, factory):
        self.factory = factory

    def __call__(self, *args, **kwargs):
        return self.factory(*args, **kwargs)

    def __deepcopy__(self, memo) -> "SharedOnCopy":
        return self


def build_module(config: dict) -> IGDiTModule:
    """An IGDiTModule from an experiment's ``model:`` section (a plain dict), parsed and instantiated exactly as
    the Lightning CLI does, so its hyper-parameters are the resolved config and its checkpoints reload with
    ``IGDiTModule.load_from_checkpoint`` (and ``torch.load(weights_only=True)``)."""

    parser = config_parser()
    parser.add_class_arguments(IGDiTModule, "model", fail_untyped=False)
    cfg = parser.parse_object({"model": copy.deepcopy(config)})  # jsonargparse converts nested dicts in place
    resolved = plain_config(parser, cfg)["model"]
    # The LightningCLI records its config the same way (lightning.pytorch.cli._InstantiatorFn).
    with given_hyperparameters(resolved, "lightning.pytorch.cli.instantiate_module"):
        return parser.instantiate(cfg).model

