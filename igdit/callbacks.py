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
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from igdit.checkpoints import checkpoint_step, newest_checkpoint

from igdit.config import ConfigError, TrainingStopped
from igdit.generation import Sampling, class_grid
from igdit.guidance import Denoiser, InternalGuidance, describe, parse_settings
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
                and RunningStage.TRAINING in self._t0s:
            self._t0s[RunningStage.TRAINING] += time.perf_counter() - last
        self._last_val_batch_end = None


class SampleGrid(pl.Callback):
    """At the end of fit, samples one row per class with and without Internal Guidance (same noise).

    Runs after EMAWeightAveraging has copied the averaged weights into the model, so the grid shows the
    EMA weights. The PNG goes into the run folder and into the MLflow run's artifacts.
    samples_per_class: images per class on each side; steps: Euler steps; ig_scale: w of the IG side.
    """

    def __init__(self, samples_per_class: PositiveInt = 8, steps: PositiveInt = 50, ig_scale: NonNegativeFloat = 2.0,
                 seed: NonNegativeInt = 0, filename: str = "samples.png"):
        self.samples_per_class, self.steps, self.ig_scale = samples_per_class, steps, ig_scale
        self.seed, self.filename = seed, filename
        self.path: Optional[Path] = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if not pl_module.backbone.exit_indices and self.ig_scale != 1.0:
            raise ConfigError("SampleGrid.ig_scale", self.ig_scale, "needs an exit head and model.backbone.exits is "
                                                                    "empty (1 turns the IG side off)")

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        sampling = Sampling("euler", self.steps)
        blocks = class_grid(pl_module, self.samples_per_class, sampling,
                            [[], [InternalGuidance(self.ig_scale)]], self.seed)
        # overwrite: a run extended past its end (resumed with more steps) shows its new final weights
        self.path = save_png(image_grid(blocks, upscale=max(1, 32 // blocks[0].shape[-1])),
                             run_directory(trainer) / self.filename, overwrite=True)
        logger = trainer.logger
        if isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(self.path))


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
    sampler, steps, schedule: as `igdit sample` (schedule None: the sampler's default grid).
    """

    def __init__(self, settings: Optional[dict] = None, num_samples: PositiveInt = 10_000,
                 every_n_steps: Optional[PositiveInt] = None, sampler: Literal["euler", "heun", "sde"] = "euler",
                 steps: PositiveInt = 50, schedule: Optional[Literal["uniform", "sde", "shifted"]] = None,
                 labels: Literal["balanced", "random"] = "balanced", feature: Literal["digits", "inception"] = "inception",
                 reference: str = "train", reference_max_samples: Optional[PositiveInt] = 50_000,
                 cache_reference: bool = True, inception_weights: Optional[str] = None, allow_download: bool = False,
                 inception_score: bool = True, batch_size: PositiveInt = 250, seed: NonNegativeInt = 0,
                 grid_size: NonNegativeInt = 100):
        f = "FIDCallback"
        self.settings = parse_settings({"none": {}} if settings is None else settings, f"{f}.settings")
        if num_samples < 2:
            raise ConfigError(f"{f}.num_samples", num_samples, "a Fréchet distance needs at least 2 samples")
        if sampler == "sde" and steps < 2:
            raise ConfigError(f"{f}.steps", steps, "the sde sampler needs at least 2 steps")
        self.num_samples, self.every_n_steps = num_samples, every_n_steps
        self.sampling = Sampling(sampler, steps, schedule)
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
            if isinstance(averaging, WeightAveraging) and averaging._average_model is not None:
                # The averaging callback swaps the EMA weights in at validation start and out again in its own
                # on_validation_epoch_end: if that already ran, the averaged copy holds the EMA weights.
                if trainer.callbacks.index(averaging) < trainer.callbacks.index(self):
                    module = averaging._average_model.module
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
        for name, images in grids.items():
            path = run_directory(trainer) / "fid" / f"step{trainer.global_step:08d}-{name}.png"
            if len(images) < 10 or path.exists():  # an earlier evaluation of this step (igdit eval twice): keep it
                continue
            save_grid(images, path)
            logger = trainer.logger
            if isinstance(logger, MLFlowLogger):
                logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="fid")

    def state_dict(self) -> dict:
        return {"last_eval_step": self.last_eval_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_eval_step = state_dict.get("last_eval_step")


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
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
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
