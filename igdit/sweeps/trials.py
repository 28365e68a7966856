"""What one trial does: score a guidance setting on a fixed checkpoint, or train the base experiment."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import optuna
import torch

from igdit.callbacks import FIDCallback
from igdit.checkpoints import load_module
from igdit.config import ConfigError
from igdit.data import LatentDataModule
from igdit.experiment import run_lightning_cli
from igdit.guidance import describe
from igdit.metrics.evaluate import evaluate_settings
from igdit.metrics.fid import warn_if_singular
from igdit.sweeps.spec import SweepSpec


def check_constraints(spec: SweepSpec, values: dict) -> None:
    """Prune (before any compute) a trial whose values break one of the file's constraints."""
    for left, op, right in spec.constraints:
        a, b = values[left], values[right]
        if not (a < b if op == "<" else a <= b):
            raise optuna.TrialPruned(f"constraint {left} {op} {right} does not hold ({a} vs {b})")


class SamplingTrial:
    """Scores one guidance setting per trial on a fixed checkpoint (loaded once, with the reference)."""

    def __init__(self, spec: SweepSpec, checkpoint: str):
        callback = spec.evaluation_callback()
        self.spec, self.callback, self.checkpoint = spec, callback, str(Path(checkpoint).resolve())
        self.setting_name, self.base_rules = next(iter(callback.settings.items()))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.module = load_module(checkpoint, "--ckpt", device)
        if self.module.data_meta is None:
            raise ConfigError("--ckpt", checkpoint, "carries no shard meta.json, so its samples cannot be decoded")
        self.evaluator = callback.build_evaluator(LatentDataModule(root=spec.data_root()), device)
        warn_if_singular(callback.num_samples, self.evaluator.num_features, "evaluation.num_samples")
        self.value_key = "is" if spec.metric_name == "is" else "fd"
        self.metric = f"{spec.metric_name}/{self.setting_name}"

    def describe(self, values: dict) -> dict:
        """What the trial runs, as plain values: the checkpoint, the setting's rules with the trial's values, and
        the evaluation protocol (the trial's MLflow params and config.yaml)."""
        c = self.callback
        return {"checkpoint": self.checkpoint, "setting": self.setting_name,
                "guidance": describe(self.spec.setting_rules(self.base_rules, values)),
                "evaluation": {"metric": self.metric, "num_samples": c.num_samples, **c.sampling.describe(),
                               "labels": c.labels, "seed": c.seed, "feature": c.feature, "reference": c.reference}}

    def __call__(self, trial, values: dict, run_id: str) -> float:
        c = self.callback
        rules = self.spec.setting_rules(self.base_rules, values)
        results, _ = evaluate_settings(self.module, {self.setting_name: rules}, self.evaluator, c.num_samples,
                                       c.sampling, c.labels, c.seed, c.batch_size, grid_size=0, progress=True)
        result = results[self.setting_name]
        trial.set_user_attr("nfe", result["nfe"])
        trial.set_user_attr("seconds", round(result["seconds"], 2))
        trial.set_user_attr("num_samples", result["num_samples"])
        return result[self.value_key]


class OptunaPruning(pl.Callback):
    """Reports the FIDCallback's value to the trial after each of its evaluations (step = global step, not
    epoch: optuna-integration's Lightning callback reports per epoch) and stops a trial the pruner rejects."""

    def __init__(self, trial, monitor: str):
        self.trial, self.monitor = trial, monitor
        self.last_value: Optional[float] = None

    def on_validation_end(self, trainer, pl_module) -> None:
        fid = next((c for c in trainer.callbacks if isinstance(c, FIDCallback)), None)
        if trainer.sanity_checking or fid is None or fid.last_eval_step != trainer.global_step:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        self.last_value = float(value)
        self.trial.report(self.last_value, step=trainer.global_step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.monitor} {self.last_value:.4g} at step {trainer.global_step}")


class TrainingTrial:
    """Trains the base experiment with the trial's overrides through the Lightning CLI (`igdit fit`'s path)."""

    def __init__(self, spec: SweepSpec):
        self.spec = spec
        self.metric = f"{spec.metric_name}/{spec.setting}"

    def arguments(self, values: dict, run_id: Optional[str]) -> list[str]:
        args = ["--config", self.spec.base, *self.spec.trial_arguments(values)]
        if run_id is not None:
            args += ["--trainer.logger.init_args.run_id", run_id]
            if self.spec.tracking_uri:
                args += ["--trainer.logger.init_args.tracking_uri", self.spec.tracking_uri]
        return args

    def __call__(self, trial, values: dict, run_id: str) -> float:
        cli = run_lightning_cli(self.arguments(values, run_id), run=False)
        callbacks = cli.trainer.callbacks
        at = next(i for i, c in enumerate(callbacks) if isinstance(c, FIDCallback))
        callbacks[at] = self.spec.evaluation_callback()  # the sweep's evaluation protocol, in the same place
        pruning = OptunaPruning(trial, self.metric)
        callbacks.append(pruning)
        cli.before_fit()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        if pruning.last_value is None:
            raise RuntimeError(f"no {self.metric} was computed in {self.spec.train.max_steps} steps; let the "
                               "FIDCallback evaluate within train.max_steps (every_n_steps, val_check_interval)")
        return pruning.last_value
