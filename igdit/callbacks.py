"""Lightning callbacks: the end-of-run sample grid, training throughput and the periodic Fréchet distance."""
from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from pathlib import Path
from typing import Literal, Optional

import lightning.pytorch as pl
import torch
import numpy as np
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor, WeightAveraging
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from igdit.checkpoints import checkpoint_step, newest_checkpoint

from igdit.compat import averaged_model, throughput_clocks
from igdit.config import ConfigError, TrainingStopped
from igdit.generation import Sampling, class_grid
from igdit.guidance import Denoiser, describe, parse_settings
from igdit.images import image_grid, save_grid, save_png
from igdit.metrics.evaluate import FrechetEvaluator, check_reference, evaluate_settings
from igdit.metrics.features import METRIC_NAMES, InceptionFeatures, inception_weights_candidates
from igdit.metrics.fid import ReferenceStats, check_reference_file, warn_if_singular
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

    def on_validation_batch_end(self, trainer, *args, **kwargs) -> None:
        super().on_validation_batch_end(trainer, *args, **kwargs)
        self._last_val_batch_end = time.perf_counter()

    def on_validation_end(self, trainer, *args) -> None:
        # Lightning's monitor takes validation to end with its last batch; work done after it (the FIDCallback's
        # sampling in on_validation_epoch_end) would otherwise count as training time and sink samples/s.
        super().on_validation_end(trainer, *args)
        last = getattr(self, "_last_val_batch_end", None)
        if last is not None and not trainer.sanity_checking and trainer.state.fn == "fit" \
                and RunningStage.TRAINING in throughput_clocks(self):
            throughput_clocks(self)[RunningStage.TRAINING] += time.perf_counter() - last
        self._last_val_batch_end = None


class SampleGrid(pl.Callback):
    """At the end of fit, samples one row per class under each named guidance setting (same noise), the settings
    side by side.

    Runs after EMAWeightAveraging has copied the averaged weights into the model, so the grid shows the
    EMA weights. The PNG goes into the run folder and into the MLflow run's artifacts.
    samples_per_class: images per class in each setting; steps: Euler steps.
    settings: {name: {rule: {fields}}}, as FIDCallback's (rules by key, ``ig``, ``cfg``, ``ag``, or import path);
        default: the final head alone (``none``) and, when the backbone has an exit head, Internal Guidance at
        w = 2 (``ig``). ig_scale: the older spelling of ``{none: {}, ig: {ig: {scale: ig_scale}}}``.
    """

    def __init__(self, samples_per_class: PositiveInt = 8, steps: PositiveInt = 50, settings: Optional[dict] = None,
                 ig_scale: Optional[NonNegativeFloat] = None, seed: NonNegativeInt = 0, filename: str = "samples.png"):
        if settings is not None and ig_scale is not None:
            raise ConfigError("SampleGrid.ig_scale", ig_scale, "give settings or the older ig_scale, not both")
        if ig_scale is not None:
            settings = {"none": {}, "ig": {"ig": {"scale": ig_scale}}}
        self.settings = None if settings is None else parse_settings(settings, "SampleGrid.settings")
        self.samples_per_class, self.steps = samples_per_class, steps
        self.seed, self.filename = seed, filename
        self.path: Optional[Path] = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.settings is None:  # the default needs the backbone: IG only where there is an exit head
            default = {"none": {}, "ig": {"ig": {"scale": 2.0}}} if pl_module.backbone.exit_indices else {"none": {}}
            self.settings = parse_settings(default, "SampleGrid.settings")
        for name, rules in self.settings.items():
            try:  # each rule checks what it needs from the model before any training step
                Denoiser(pl_module.backbone, rules)
            except ConfigError as err:
                raise ConfigError(f"SampleGrid.settings.{name}.{err.field.split('.', 1)[-1]}", err.value,
                                  err.allowed) from None

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        sampling = Sampling("euler", self.steps)
        blocks = class_grid(pl_module, self.samples_per_class, sampling, list(self.settings.values()), self.seed,
                            progress=trainer.progress_bar_callback is not None)
        names = (pl_module.data_meta or {}).get("class_names") or [str(c) for c in range(pl_module.num_classes)]
        grid = image_grid(blocks, upscale=max(1, 32 // blocks[0].shape[-1]), row_labels=[str(n)[:12] for n in names],
                          block_labels=[setting_label(rules) for rules in self.settings.values()])
        # overwrite: a run extended past its end (resumed with more steps) shows its new final weights
        self.path = save_png(grid, run_directory(trainer) / self.filename, overwrite=True)
        logger = trainer.logger
        if isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(self.path))


def setting_label(rules) -> str:
    """A guidance setting as a grid's column reads it: "no guidance", "IG w = 2", "IG w = 2 + CFG w = 1.5"."""
    names = {"ig": "IG", "cfg": "CFG", "ag": "AG"}
    active = [rule for rule in rules if rule.scale != 1.0]
    return " + ".join(f"{names.get(rule.key, rule.key)} w = {rule.scale:g}" for rule in active) or "no guidance"


class FIDCallback(pl.Callback):
    """Fréchet distance of generated samples, computed inside validation passes on the EMA weights.

    In each validation pass at least ``every_n_steps`` optimizer steps after the previous evaluation (every
    pass when None; always under ``igdit validate``/``igdit eval``), every rank generates its share of
    ``num_samples`` images per named guidance setting with ``sampler``/``steps``, streams them through one
    torchmetrics metric and logs ``<metric>/<setting>`` (``fd_digits`` on the digits network, ``fid`` on
    Inception, plus ``is/<setting>``), and a grid of the samples to MLflow. ModelCheckpoint can monitor any
    of those names. EMAWeightAveraging swaps the averaged weights in for validation; this callback scores
    them whatever the order of the two in ``trainer.callbacks``, and records which weights it scored.

    settings: {name: {rule: {fields}}}, rules by key (``ig``, ``cfg``, ``ag``) or import path, e.g.
        ``ig_cfg: {ig: {scale: 2.0}, cfg: {scale: 1.5, interval: [0.0, 0.7]}}`` (t = 1 is noise, intervals
        inclusive); ``{}`` is the unguided model.
    feature: "digits" (a small network trained on the data set's own images, cached beside the shards) or
        "inception".
    reference: "train" or "val" (the shards, decoded; statistics cached under <root>/fid_refs/) or an .npz
        with mu and sigma (e.g. the ADM suite's reference batch); reference_max_samples caps a split.
    labels: "balanced" (num_samples / classes each) or "random".
    sampler, steps, schedule: as `igdit sample` (schedule None: the sampler's default grid); names from
        ``igdit.samplers.SAMPLERS`` / ``SCHEDULES`` or import paths of one's own.
    """

    def __init__(self, settings: Optional[dict] = None, num_samples: PositiveInt = 10_000,
                 every_n_steps: Optional[PositiveInt] = None, sampler: str = "euler",
                 steps: PositiveInt = 50, schedule: Optional[str] = None,
                 labels: Literal["balanced", "random"] = "balanced", feature: Literal["digits", "inception"] = "inception",
                 reference: str = "train", reference_max_samples: Optional[PositiveInt] = 50_000,
                 cache_reference: bool = True, inception_weights: Optional[str] = None, allow_download: bool = False,
                 inception_score: bool = True, batch_size: PositiveInt = 250, seed: NonNegativeInt = 0,
                 grid_size: NonNegativeInt = 100):
        f = "FIDCallback"
        self.settings = parse_settings({"none": {}} if settings is None else settings, f"{f}.settings")
        if num_samples < 2:
            raise ConfigError(f"{f}.num_samples", num_samples, "a Fréchet distance needs at least 2 samples")
        self.num_samples, self.every_n_steps = num_samples, every_n_steps
        self.sampling = Sampling.checked(f"{f}.", sampler, steps, schedule)
        self.labels, self.feature = labels, feature
        self.metric_name = METRIC_NAMES[feature]
        self.reference = check_reference(reference, f"{f}.reference")
        self.reference_max_samples, self.cache_reference = reference_max_samples, cache_reference
        self.inception_weights, self.allow_download, self.inception_score = inception_weights, allow_download, inception_score
        self.batch_size, self.seed, self.grid_size = batch_size, seed, grid_size
        self.evaluator = None
        self.last_eval_step: Optional[int] = None
        self.last_results: dict[str, dict] = {}
        self.scored_weights: Optional[str] = None

    # ---- checks and reference, before any training step --------------------------------------------
    def check(self, trainer, pl_module, stage: str = "fit") -> None:
        """Everything that can be checked without computing: the settings against the model (each rule checks
        and loads what it needs), the labels, the monitors, the Inception weights. The CLI calls it before a run
        is created; setup calls it again for `validate`."""
        f = "FIDCallback"
        for name, rules in self.settings.items():
            try:  # each rule checks (and loads) what it needs from the model now, before any training step
                Denoiser(pl_module.backbone, rules)
            except ConfigError as err:
                raise ConfigError(f"{f}.settings.{name}.{err.field.split('.', 1)[-1]}", err.value, err.allowed) from None
        if self.labels == "balanced" and self.num_samples % pl_module.num_classes:
            raise ConfigError(f"{f}.num_samples", self.num_samples,
                              f"labels: balanced needs a multiple of the {pl_module.num_classes} classes")
        self._check_monitors(trainer, stage)
        interval = getattr(trainer, "val_check_interval", None)
        if stage == "fit" and self.every_n_steps is not None and isinstance(interval, int) \
                and getattr(trainer, "check_val_every_n_epoch", 1) is None and self.every_n_steps % interval:
            raise ConfigError(f"{f}.every_n_steps", self.every_n_steps, "FID runs inside validation passes, which "
                              f"come every {interval} steps (trainer.val_check_interval): choose a multiple of "
                              f"{interval}, or set trainer.val_check_interval to {self.every_n_steps}")
        if self.reference.endswith(".npz"):
            check_reference_file(self.reference, self.feature, f"{f}.reference")
        if self.feature == "inception" and not self.allow_download and not any(
                p.is_file() for p in inception_weights_candidates(self.inception_weights)):
            InceptionFeatures(self.inception_weights, False, f"{f}.inception_weights")  # its one-line error

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage not in ("fit", "validate"):
            return
        self.check(trainer, pl_module, stage)
        f = "FIDCallback"
        self.evaluator = self.build_evaluator(trainer.datamodule, trainer.strategy.root_device)
        warn_if_singular(self.num_samples, self.evaluator.num_features, f"{f}.num_samples")
        if trainer.logger is not None:
            trainer.logger.log_hyperparams({
                "fid/metric": self.metric_name, "fid/num_samples": self.num_samples,
                **{f"fid/{k}": v for k, v in self.sampling.describe().items()}, "fid/labels": self.labels,
                "fid/reference": self.reference, "fid/reference_samples": self.evaluator.reference.n,
                "fid/seed": self.seed, "fid/settings": json.dumps({k: describe(v) for k, v in self.settings.items()})})

    def build_evaluator(self, datamodule, device):
        """This callback's feature network and reference statistics, ready to score on ``device`` (a sampling
        sweep builds its trials' evaluator here too). datamodule: the LatentDataModule of the shards."""
        f = "FIDCallback"
        data = datamodule if hasattr(datamodule, "latent_batches") else None
        evaluator = FrechetEvaluator(self.feature, data, self.inception_weights, self.allow_download,
                                     self.inception_score, f"{f}.feature", f"{f}.inception_weights").to(device)
        if self.reference.endswith(".npz"):
            evaluator.use_reference(ReferenceStats.load(self.reference, evaluator.num_features, self.feature,
                                                        f"{f}.reference"))
        elif not hasattr(datamodule, "latent_batches"):
            raise ConfigError(f"{f}.reference", self.reference, "needs igdit's LatentDataModule; pass an .npz")
        else:
            evaluator.reference_from_data(datamodule, self.reference, self.batch_size, self.reference_max_samples,
                                          self.cache_reference)
        return evaluator

    def _check_monitors(self, trainer, stage: str) -> None:
        """A ModelCheckpoint may monitor only what this callback logs, and (when fitting) needs the value in
        every validation pass: Lightning stops with an error at a pass where the monitored key is missing."""
        ours = {f"{self.metric_name}/{name}" for name in self.settings}
        if self.feature == "inception" and self.inception_score:
            ours |= {f"is/{name}" for name in self.settings}
        interval = getattr(trainer, "val_check_interval", None)
        for checkpoint in trainer.checkpoint_callbacks:
            monitor = getattr(checkpoint, "monitor", None) or ""
            if monitor.split("/")[0] in (*METRIC_NAMES.values(), "is") and monitor not in ours:
                raise ConfigError("ModelCheckpoint.monitor", monitor, "FIDCallback logs " + ", ".join(sorted(ours)))
            if monitor in ours and stage == "fit" and self.every_n_steps is not None and (
                    not isinstance(interval, int) or self.every_n_steps > interval):
                raise ConfigError("FIDCallback.every_n_steps", self.every_n_steps,
                                  f"a ModelCheckpoint monitors {monitor}, so FID must run in every validation pass: "
                                  f"set trainer.val_check_interval to {self.every_n_steps} (now {interval}) or "
                                  "every_n_steps to null")

    # ---- evaluation --------------------------------------------------------------------------------
    def _due(self, trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != "fit" or self.every_n_steps is None:
            return True
        since = trainer.global_step - (self.last_eval_step or 0)
        return since >= self.every_n_steps

    def _scored_module(self, trainer, pl_module):
        """The module holding the EMA weights right now, and a name for them."""
        if trainer.state.fn != "fit":
            return pl_module, "checkpoint"
        for averaging in trainer.callbacks:
            if isinstance(averaging, WeightAveraging) and averaged_model(averaging) is not None:
                # The averaging callback swaps the EMA weights in at validation start and out again in its own
                # on_validation_epoch_end: if that already ran, the averaged copy holds the EMA weights.
                if trainer.callbacks.index(averaging) < trainer.callbacks.index(self):
                    module = averaged_model(averaging).module
                    module.data_meta = pl_module.data_meta
                    return module, "ema"
                return pl_module, "ema"
        return pl_module, "raw"

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.evaluator is None or not self._due(trainer):
            return
        module, weights = self._scored_module(trainer, pl_module)
        if weights != self.scored_weights and trainer.logger is not None:
            trainer.logger.log_hyperparams({"fid/weights": weights})
        self.scored_weights = weights
        with trainer.precision_plugin.forward_context():
            results, grids = evaluate_settings(module, self.settings, self.evaluator, self.num_samples, self.sampling,
                                               self.labels, self.seed, self.batch_size, self.grid_size,
                                               progress=trainer.is_global_zero and trainer.progress_bar_callback is not None)
        self.last_eval_step, self.last_results = trainer.global_step, results
        pl_module.log("eval/seconds", sum(r["seconds"] for r in results.values()), sync_dist=False)
        for name, result in results.items():
            pl_module.log(f"{self.metric_name}/{name}", result["fd"], sync_dist=False)
            if "is" in result:
                pl_module.log(f"is/{name}", result["is"], sync_dist=False)
        if trainer.is_global_zero and self.grid_size:
            self._save_grids(trainer, grids)

    def _save_grids(self, trainer, grids: dict[str, torch.Tensor]) -> None:
        """Each setting's grid as fid/step<N>-<setting>.png in the run folder and as the MLflow image
        ``fid/<setting>`` at step N, so that the UI's step slider walks through a setting's grids."""
        from PIL import Image

        for name, images in grids.items():
            path = run_directory(trainer) / "fid" / f"step{trainer.global_step:08d}-{name}.png"
            if len(images) < 10 or path.exists():  # an earlier evaluation of this step (igdit eval twice): keep it
                continue
            save_grid(images, path)
            logger = trainer.logger
            if isinstance(logger, MLFlowLogger):
                with Image.open(path) as grid:
                    logger.experiment.log_image(logger.run_id, grid.convert("RGB"), key=f"fid/{name}",
                                                step=trainer.global_step, synchronous=True)

    def state_dict(self) -> dict:
        return {"last_eval_step": self.last_eval_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_eval_step = state_dict.get("last_eval_step")


class StepProgress(pl.Callback):
    """A line every ``every`` of the run's steps (a fraction of max_steps), with the time so far and an ETA, for runs
    without a progress bar: the study's runs, trained one after the other or in parallel processes, into a log
    where a bar would be one line rewritten thousands of times (and two processes' bars would overwrite each
    other). ``label`` starts each line (``"st seed 1"``)."""

    def __init__(self, label: str = "", every: PositiveFloat = 0.1):
        self.label, self.every = label, every
        self.started: Optional[float] = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.started, self.first_step = time.perf_counter(), trainer.global_step
        self.next_step = self._after(trainer, trainer.global_step)

    def _after(self, trainer, step: int) -> int:
        stride = max(1, round(self.every * trainer.max_steps)) if trainer.max_steps > 0 else 1
        return (step // stride + 1) * stride

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or self.started is None or step < self.next_step:
            return
        self.next_step = self._after(trainer, step)
        spent = time.perf_counter() - self.started
        done, total = step - self.first_step, trainer.max_steps
        eta = f", ETA {_duration(spent / done * (total - step))}" if done and total > step else ""
        share = f" ({100 * step / total:.0f}%)" if total > 0 else ""
        loss = trainer.callback_metrics.get("train/loss")
        loss = f", train/loss {float(loss):.4f}" if loss is not None else ""
        print(f"{self.label + ': ' if self.label else ''}step {step}/{total}{share}, {_duration(spent)}{eta}{loss}",
              flush=True)


def _duration(seconds: float) -> str:
    """``"42s"``, ``"7m05s"``, ``"1h12m"``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class StepFromCheckpoint(pl.Callback):
    """Under ``validate`` (`igdit eval`, `igdit validate`), the trainer's step counters as the checkpoint's training
    left them, so that metrics and grids are logged at the checkpoint's step: the same MLflow step at which the
    training run logged its own evaluation of that checkpoint (Lightning would log them at step 0)."""

    def __init__(self):
        self.loops: Optional[dict] = None

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.loops = (checkpoint.get("loops") or {}).get("fit_loop")

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate" and self.loops:
            trainer.fit_loop.load_state_dict(self.loops)


class FinalStepMetrics(pl.Callback):
    """Logs the last training step's ``train/*`` values when that step is not one of Lightning's logging steps
    (every ``log_every_n_steps``): a 20-step run with ``log_every_n_steps: 25`` would otherwise log no loss at all,
    and every run's curve would stop short of its end."""

    def on_train_end(self, trainer, pl_module) -> None:
        step, every = trainer.global_step, trainer.log_every_n_steps
        if trainer.logger is None or step == 0 or (every and step % every == 0):
            return
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()
                   if key.startswith("train/") and getattr(value, "numel", lambda: 1)() == 1}
        if metrics:  # at Lightning's step for that batch (its index), where a logging step would have put them
            trainer.logger.log_metrics(metrics, step=step - 1)


class ModelSummary(LightningModelSummary):
    """Lightning's model summary without its FLOPs column, which counts a forward pass of the module's
    ``example_input_array`` (igdit's module has none: it read 0), and with the FLOPs of one training step instead
    (forward + backward on the per-device batch, counted on the meta device; what SamplesThroughput's MFU uses)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self.step_flops, self.batch = getattr(pl_module, "flops_per_batch", None), None
        datamodule = getattr(trainer, "datamodule", None)
        self.batch = getattr(datamodule, "per_device_batch_size", None)
        if self.step_flops is None and self.batch and hasattr(pl_module, "training_flops"):
            try:
                self.step_flops = pl_module.training_flops(self.batch)
            except Exception:  # a backbone that cannot run on the meta device: no line rather than a wrong one
                self.step_flops = None
        super().on_fit_start(trainer, pl_module)

    def summarize(self, summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:
        from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table
        from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count

        columns = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes, 0,
                                      *columns).splitlines()
        table = [line for line in table if not line.endswith("Total Flops")]
        if getattr(self, "step_flops", None):
            table.append(f"{get_human_readable_count(self.step_flops):<10}FLOPs per training step (forward + "
                         f"backward, batch {self.batch} per device)")
        rank_zero_info("\n" + "\n".join(table))


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with ``last`` meaning last, resumable evaluations and interruptions that keep
    the work done:

    * the final step is always saved as ``last.ckpt`` (at the end of its batch; Lightning's own end-of-training save
      comes after EMAWeightAveraging has copied the averaged weights into the model, so it would store the EMA
      weights as the raw ones too — a last.ckpt here holds the raw weights as ``current_model_state`` and the EMA
      as ``state_dict``, always);
    * a periodic save that falls on a step with a validation pass waits for that pass to end, so the checkpoint
      already holds the evaluation of its step (a run killed during it resumes from the previous checkpoint and
      redoes it instead of losing it);
    * the last checkpoint of a run is always ``last.ckpt``, replaced in place (Lightning writes ``last-v1.ckpt`` when
      a resumed run finds a last.ckpt it does not know it wrote, and a later ``--ckpt_path last`` then read the old one);
    * SIGTERM or SIGINT (Lightning's loops stop at the end of the step, ``StopOnSignal``) saves ``last.ckpt`` at the
      step they stopped at;
    * a checkpoint that cannot be written (disk full) stops the run with one line naming the last good checkpoint:
      files are written whole or not at all (``igdit.checkpoints.AtomicCheckpointIO``), so that one is intact.
    """

    def check(self, trainer, pl_module, stage: str = "fit") -> None:
        """A validation value to monitor must be one the module logs in every validation pass (Lightning stops at the
        first pass with a traceback otherwise, after training has started); FID monitors are FIDCallback's check."""
        monitor = self.monitor or ""
        if not monitor.startswith("val/"):
            return
        terms = list(getattr(pl_module, "objective", {}) or {})
        name = monitor[len("val/"):]
        if name != "loss" and name not in terms and name.split("/")[0] not in terms:
            raise ConfigError("ModelCheckpoint.monitor", monitor, "validation logs val/loss and val/<term> for the "
                              f"terms {', '.join(terms)} (or a FIDCallback metric such as fd_digits/<setting>)")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if any(getattr(callback, "suspicious", False) for callback in trainer.callbacks):
            return  # the loss is running away: keep the last good checkpoint as it is
        every = self._every_n_train_steps
        step = trainer.global_step
        validates_now = isinstance(trainer.val_check_interval, int) and trainer.check_val_every_n_epoch is None \
            and step % trainer.val_check_interval == 0
        final = self._final_step(trainer)
        if validates_now and not final and (every and step % every == 0 or self.save_last and trainer.received_sigterm):
            self._defer_save_until_validation = True  # Lightning's own deferral: saved in on_validation_end
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.save_last and (final or trainer.received_sigterm) and self._last_global_step_saved != step:
            monitor_candidates = self._monitor_candidates(trainer)
            if self.monitor is None or self.monitor in monitor_candidates:
                self._save_topk_checkpoint(trainer, monitor_candidates)
            self._save_last_checkpoint(trainer, monitor_candidates)
            self._last_global_step_saved = step

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Lightning's own save_on_exception saves on any exception, a diverging run's too: here only an interruption
        # saves, and only last.ckpt, when the step it stopped at is not saved yet (a signal during a validation pass).
        if isinstance(exception, SIGTERMException) and self.save_last and trainer.state.fn == TrainerFn.FITTING \
                and not trainer.sanity_checking and self._last_global_step_saved != trainer.global_step \
                and not any(getattr(callback, "suspicious", False) for callback in trainer.callbacks):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer, pl_module) -> None:
        """Nothing: the final step was saved at the end of its batch, before the EMA copy."""

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        if self.save_last and self.dirpath is not None:  # the name Lightning versions when it thinks it is not its own
            self.last_model_path = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        try:
            super()._save_checkpoint(trainer, filepath)
        except OSError as err:
            good = newest_checkpoint(self.dirpath) if self.dirpath else None
            what = f"{good} (step {checkpoint_step(good)})" if good else "none: no checkpoint was written yet"
            raise TrainingStopped(f"could not write the checkpoint {filepath} ({err.strerror or err}); checkpoints are "
                                  f"written whole or not at all, and the last good one is {what}; free space and "
                                  "resume with --ckpt_path last") from None

    @staticmethod
    def _final_step(trainer) -> bool:
        return trainer.global_step >= trainer.max_steps > 0 or trainer.should_stop


class DivergenceGuard(pl.Callback):
    """Stops a run that diverges, keeping the last good checkpoint and naming it, from the first steps on.

    * ``ceiling``: a loss above it stops the run at once (a flow-matching loss on normalised latents is of order 1;
      lr 1e6 took it from 2.6 to 1.7e12 at step 2);
    * before the running median has ``warmup_steps`` of history: a loss more than (``early_factor`` - 1) x |m0|
      above m0, the median of the first ``early_steps`` losses, for ``patience`` steps in a row;
    * after: a loss more than (``factor`` - 1) x |median| above its running median (over the last ``window`` steps)
      for ``patience`` steps in a row: above ``factor`` x the median for the usual positive loss, and still a rise,
      not a fall, when terms make the loss negative (the dispersive loss is a log-mean-exp <= 0).

    Either stops training with a one-line message. A non-finite loss stops at once, in the module, before the
    weights are touched. Checkpoints written while the loss was running away are not the last good one.
    """

    def __init__(self, factor: PositiveFloat = 10.0, patience: PositiveInt = 20, window: PositiveInt = 200,
                 warmup_steps: NonNegativeInt = 100, ceiling: PositiveFloat = 1e4, early_factor: PositiveFloat = 100.0,
                 early_steps: PositiveInt = 5):
        if factor <= 1:
            raise ConfigError("DivergenceGuard.factor", factor, "expected a factor > 1 of the running median")
        if early_factor <= 1:
            raise ConfigError("DivergenceGuard.early_factor", early_factor, "expected a factor > 1 of the first "
                                                                           "steps' loss")
        self.factor, self.patience, self.window, self.warmup_steps = factor, patience, window, warmup_steps
        self.ceiling, self.early_factor, self.early_steps = ceiling, early_factor, early_steps
        self.history: list[float] = []
        self.first: list[float] = []  # the first early_steps healthy losses of the run (kept across resumes)
        self.above = 0
        self.good_checkpoint: Optional[str] = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        value = float(loss.detach())
        if value > self.ceiling:
            raise TrainingStopped(
                f"training diverged at step {trainer.global_step}: loss {value:.4g} is above DivergenceGuard.ceiling "
                f"{self.ceiling:g}; " + last_good_checkpoint(trainer, self.good_checkpoint))
        if len(self.history) >= min(self.window, max(self.warmup_steps, 1)):
            median = float(np.median(self.history[-self.window:]))
            limit, reason = median + (self.factor - 1) * abs(median), \
                f"its running median {median:.4g} + {self.factor:g} - 1 times its size"
        elif len(self.first) >= self.early_steps:
            start = float(np.median(self.first))
            limit, reason = start + (self.early_factor - 1) * abs(start), \
                f"the median {start:.4g} of the first {self.early_steps} steps + {self.early_factor:g} - 1 times its size"
        else:
            limit = None
        if limit is not None:
            self.above = self.above + 1 if value > limit else 0
            if self.above >= self.patience:
                raise TrainingStopped(
                    f"training diverged at step {trainer.global_step}: loss {value:.4g} stayed above {limit:.4g} "
                    f"({reason}) for {self.patience} steps; " + last_good_checkpoint(trainer, self.good_checkpoint))
        if self.above == 0:  # only steps that look healthy enter the median
            self.history = (self.history + [value])[-self.window:]
            if len(self.first) < self.early_steps:
                self.first.append(value)
            checkpoint = trainer.checkpoint_callback
            self.good_checkpoint = getattr(checkpoint, "last_model_path", None) or self.good_checkpoint

    @property
    def suspicious(self) -> bool:
        """True while the loss is above the threshold: checkpoints wait (igdit.callbacks.Checkpoint)."""
        return self.above > 0

    def state_dict(self) -> dict:
        return {"history": list(self.history), "above": self.above, "first": list(self.first)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history, self.above = list(state_dict.get("history", [])), int(state_dict.get("above", 0))
        self.first = list(state_dict.get("first", self.history[:self.early_steps]))


class StopOnSignal(pl.Callback):
    """SIGTERM and SIGINT end training at the end of the current step, the way Lightning ends it on SIGTERM.

    Lightning's signal connector installs its SIGTERM handler when fit starts: it sets ``trainer.received_sigterm``
    (and forwards the signal to the processes its launcher started), and the loops raise ``SIGTERMException`` after
    the step in progress. Left alone, SIGINT raises KeyboardInterrupt wherever the code is, inside an optimiser step
    too, and Lightning then exits with code 1; here it goes to that same handler, so both stop between steps
    (``Checkpoint`` saves last.ckpt at that step). Outside the training loop (setup, reference statistics, the final
    grid) a signal stops at once, as a KeyboardInterrupt or a SIGTERMException; a second SIGINT always does.
    ``received``: the first signal's name, which the CLI reports and turns into the exit code. SIGUSR1 is left to
    Lightning: on SLURM it saves an hpc checkpoint and requeues the job.

    The CLI adds this callback to every trainer and calls ``trainer.fit`` inside ``listening()``."""

    def __init__(self):
        self.received: Optional[str] = None
        self.in_loop = False
        self._forwarding = False

    @contextlib.contextmanager
    def listening(self):
        """Handle SIGTERM and SIGINT while fit runs (installed before Lightning's, which calls this one too)."""
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield
            return
        # a signal the launching shell set to be ignored (SIGINT of a background job) stays ignored
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)
                    if signal.getsignal(s) is not signal.SIG_IGN}
        for number in previous:
            signal.signal(number, self._handle)
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _handle(self, number: int, frame) -> None:
        if self._forwarding:  # Lightning's handler calling this one back (it was SIGTERM's handler before it)
            return
        first = self.received is None
        self.received = self.received or signal.Signals(number).name
        if not self.in_loop or (number == signal.SIGINT and not first):
            if number == signal.SIGINT:
                raise KeyboardInterrupt
            raise SIGTERMException()
        lightning = signal.getsignal(signal.SIGTERM)
        if number == signal.SIGINT and callable(lightning) and lightning != self._handle:
            self._forwarding = True
            try:
                lightning(number, frame)
            finally:
                self._forwarding = False

    def on_train_start(self, trainer, pl_module) -> None:
        self.in_loop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self.in_loop = False


def last_good_checkpoint(trainer, path: Optional[str] = None) -> str:
    """The sentence that names the checkpoint a stopped run can be resumed from."""
    path = path or getattr(trainer.checkpoint_callback, "last_model_path", None)
    return f"the last good checkpoint is {path}" if path else "no checkpoint was written yet"
