"""Optuna sweeps over the knobs the IG paper ablates, reported in MLflow (`igdit sweep <file.yaml>`).

A sweep file (``sweeps/*.yaml``, validated on load) names a base experiment, a search space of config paths
and an objective. Two kinds:

* ``sampling``: one trained checkpoint; each trial only samples and scores one guidance setting through
  the FIDCallback's code path (``igdit.metrics.evaluate_settings``). The checkpoint, the feature network and
  the reference statistics are loaded once per sweep, so a trial costs sampling plus scoring only. Paths:
  ``guidance.{ig,cfg}.scale``, ``guidance.{ig,cfg}.interval.{low,high}``.
* ``training``: each trial trains the base experiment with its overrides (any dotted path of the Lightning
  CLI: ``model.exits``, ``model.exit_loss.weight``, ...) for ``train.max_steps`` through the same
  LightningCLI as ``igdit fit``, and reports the FIDCallback's value at every evaluation to Optuna, whose
  pruner may stop it early. Its training curves go into the trial's MLflow run.

The study lives in Optuna storage (``sqlite:///optuna.db`` by default, a PostgreSQL URL for many workers on
many machines): running the same command again continues it, and workers started against the same storage
share it. In MLflow, one parent run per study holds the best value and parameters and Optuna's plots; each
trial is a nested run tagged with the study and trial number, marked FAILED with its error when it raises.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import yaml

from igdit.config import ConfigError, check_choice, check_number

KINDS = ("sampling", "training")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("none", "median")
PARAM_TYPES = ("float", "int", "categorical")
SAMPLING_PATHS = tuple(f"guidance.{rule}.{key}" for rule in ("ig", "cfg")
                       for key in ("scale", "interval.low", "interval.high"))
EVALUATION_KEYS = ("num_samples", "sampler", "steps", "labels", "seed", "batch_size", "every_n_steps")
CONSTRAINT = re.compile(r"^\s*([\w.]+)\s*(<=|<)\s*([\w.]+)\s*$")
FINISHED = ("COMPLETE", "PRUNED", "FAIL")


# ---- the sweep file ------------------------------------------------------------------------------------
@dataclass
class ParamSpec:
    """One searched config path: float/int in [low, high] (log scale, step) or categorical choices;
    ``grid`` lists the values a grid sampler visits; ``as_list`` passes an int as [int] (``model.exits``)."""

    path: str
    type: str
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: Optional[list] = None
    grid: Optional[list] = None
    as_list: bool = False

    @classmethod
    def parse(cls, path: str, spec: Any, field_: str) -> "ParamSpec":
        if not isinstance(spec, dict):
            raise ConfigError(field_, spec, "expected {type: float|int|categorical, low, high} or {type: categorical, choices}")
        unknown = set(spec) - {"type", "low", "high", "log", "step", "choices", "grid", "as_list"}
        if unknown:
            raise ConfigError(f"{field_}.{sorted(unknown)[0]}", spec[sorted(unknown)[0]],
                              "allowed keys: type, low, high, log, step, choices, grid, as_list")
        param = cls(path=path, type=check_choice(f"{field_}.type", spec.get("type"), PARAM_TYPES),
                    low=spec.get("low"), high=spec.get("high"), log=bool(spec.get("log", False)), step=spec.get("step"),
                    choices=spec.get("choices"), grid=spec.get("grid"), as_list=bool(spec.get("as_list", False)))
        if param.type == "categorical":
            if not isinstance(param.choices, list) or not param.choices or not all(
                    v is None or isinstance(v, (bool, int, float, str)) for v in param.choices):
                raise ConfigError(f"{field_}.choices", param.choices, "expected a non-empty list of numbers or strings")
        else:
            integer = param.type == "int"
            check_number(f"{field_}.low", param.low, integer=integer)
            check_number(f"{field_}.high", param.high, low=param.low, integer=integer)
            if param.log:
                check_number(f"{field_}.low", param.low, low=0, low_inclusive=False, integer=integer)
            if param.step is not None:
                check_number(f"{field_}.step", param.step, low=0, low_inclusive=False, integer=integer)
        if param.grid is not None:
            if not isinstance(param.grid, list) or not param.grid:
                raise ConfigError(f"{field_}.grid", param.grid, "expected a non-empty list of values")
            for value in param.grid:
                if param.type == "categorical":
                    if value not in param.choices:
                        raise ConfigError(f"{field_}.grid", value, f"is not one of the choices {param.choices}")
                else:
                    check_number(f"{field_}.grid", value, low=param.low, high=param.high, integer=param.type == "int")
        return param

    def suggest(self, trial) -> Any:
        """The trial's value (a grid sampler returns one of ``grid``; the name is the config path)."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.path, self.choices)
        if self.type == "int":
            return trial.suggest_int(self.path, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.path, float(self.low), float(self.high), step=self.step, log=self.log)

    def config_value(self, value: Any) -> Any:
        return [value] if self.as_list else value


@dataclass
class SweepSpec:
    """A validated sweep file. See ``sweeps/*.yaml`` and the README for every field."""

    path: str
    name: str
    kind: str
    base: str
    search_space: dict[str, ParamSpec]
    storage: str = "sqlite:///optuna.db"
    direction: str = "minimize"
    sampler: dict = field(default_factory=lambda: {"name": "tpe", "seed": 0})
    pruner: dict = field(default_factory=lambda: {"name": "none"})
    n_trials: Optional[int] = None
    timeout: Optional[float] = None
    checkpoint: Optional[str] = None
    setting: str = "none"
    metric: Optional[str] = None
    evaluation: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    constraints: list[tuple[str, str, str]] = field(default_factory=list)
    mlflow_experiment: str = "igdit-sweeps"
    tracking_uri: Optional[str] = None

    @classmethod
    def load(cls, path: str) -> "SweepSpec":
        """Read and validate a sweep file; every problem is a one-line ConfigError naming the field."""
        if not Path(path).is_file():
            raise ConfigError("sweep", path, "is not a file; pass a sweep definition such as sweeps/ig_guidance.yaml")
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as err:
            raise ConfigError("sweep", path, f"is not valid YAML ({' '.join(str(err).split())})") from None
        if not isinstance(raw, dict):
            raise ConfigError("sweep", path, "expected a mapping with study, kind, base, objective, search_space")
        known = {"study", "kind", "base", "checkpoint", "objective", "evaluation", "train", "search_space",
                 "constraints", "mlflow"}
        for key in raw:
            if key not in known:
                raise ConfigError(key, raw[key], "is not a sweep field; allowed: " + ", ".join(sorted(known)))
        study = raw.get("study") or {}
        if not isinstance(study, dict):
            raise ConfigError("study", study, "expected a mapping with name, storage, direction, sampler, ...")
        for key in study:
            if key not in ("name", "storage", "direction", "sampler", "pruner", "n_trials", "timeout"):
                raise ConfigError(f"study.{key}", study[key], "allowed: name, storage, direction, sampler, pruner, "
                                                              "n_trials, timeout")
        name = study.get("name")
        if not isinstance(name, str) or not re.match(r"^[\w.-]+$", name):
            raise ConfigError("study.name", name, "expected a name of letters, digits, '_', '.', '-'")
        kind = check_choice("kind", raw.get("kind"), KINDS)
        base = raw.get("base")
        if not isinstance(base, str) or not Path(base).is_file():
            raise ConfigError("base", base, "expected the path of an experiment YAML, e.g. experiments/default.yaml")
        storage = study.get("storage", "sqlite:///optuna.db")
        if not isinstance(storage, str) or "://" not in storage:
            raise ConfigError("study.storage", storage, "expected an Optuna storage URL such as sqlite:///optuna.db "
                                                        "or postgresql://user@host/db")
        direction = check_choice("study.direction", study.get("direction", "minimize"), ("minimize", "maximize"))
        sampler = study.get("sampler", {"name": "tpe"})
        sampler = {"name": sampler} if isinstance(sampler, str) else dict(sampler or {})
        check_choice("study.sampler.name", sampler.get("name"), SAMPLERS)
        check_number("study.sampler.seed", sampler.setdefault("seed", 0), low=0, integer=True)
        pruner = study.get("pruner", {"name": "none"})
        pruner = {"name": pruner} if isinstance(pruner, str) else dict(pruner or {})
        check_choice("study.pruner.name", pruner.get("name"), PRUNERS)
        for key in ("n_startup_trials", "n_warmup_steps"):
            if key in pruner:
                check_number(f"study.pruner.{key}", pruner[key], low=0, integer=True)
        n_trials, timeout = study.get("n_trials"), study.get("timeout")
        if n_trials is not None:
            check_number("study.n_trials", n_trials, low=1, integer=True)
        if timeout is not None:
            check_number("study.timeout", timeout, low=0, low_inclusive=False)

        space = raw.get("search_space")
        if not isinstance(space, dict) or not space:
            raise ConfigError("search_space", space, "expected a mapping of config paths to {type, low, high} or "
                                                     "{type: categorical, choices}")
        params = {p: ParamSpec.parse(p, s, f"search_space.{p}") for p, s in space.items()}
        for p in params:
            if kind == "sampling" and p not in SAMPLING_PATHS:
                raise ConfigError(f"search_space.{p}", space[p], "sampling sweeps search " + ", ".join(SAMPLING_PATHS))
            if kind == "training" and (p.startswith("guidance.") or p.split(".")[0] not in
                                       ("model", "data", "trainer", "seed_everything")):
                raise ConfigError(f"search_space.{p}", space[p], "training sweeps search experiment fields "
                                                                 "(model.*, data.*, trainer.*)")
        if sampler["name"] == "grid":
            missing = [p for p, s in params.items() if s.grid is None and s.type != "categorical"]
            if missing:
                raise ConfigError(f"search_space.{missing[0]}.grid", None, "a grid sampler needs explicit grid values "
                                                                          "for every float/int parameter")
            if n_trials is None:
                n_trials = math.prod(len(s.grid or s.choices) for s in params.values())
        if n_trials is None and timeout is None:
            raise ConfigError("study.n_trials", None, "set n_trials or timeout (or use a grid sampler)")

        constraints = []
        for i, text in enumerate(raw.get("constraints") or []):
            match = CONSTRAINT.match(text) if isinstance(text, str) else None
            if not match or match.group(1) not in params or match.group(3) not in params:
                raise ConfigError(f"constraints[{i}]", text, "expected '<path> < <path>' or '<=' between two "
                                                             "search_space paths")
            constraints.append((match.group(1), match.group(2), match.group(3)))

        objective = raw.get("objective") or {}
        if not isinstance(objective, dict) or set(objective) - {"setting", "metric"}:
            raise ConfigError("objective", objective, "expected {setting: <FIDCallback setting name>, metric: "
                                                      "<what the callback logs: fd_digits, fid or is>}")
        setting = objective.get("setting", "none")
        evaluation = dict(raw.get("evaluation") or {})
        for key in evaluation:
            if key not in EVALUATION_KEYS or (key == "every_n_steps" and kind == "sampling"):
                raise ConfigError(f"evaluation.{key}", evaluation[key], "allowed: " + ", ".join(
                    k for k in EVALUATION_KEYS if kind == "training" or k != "every_n_steps"))
        train = dict(raw.get("train") or {})
        for key in train:
            if key not in ("max_steps", "overrides"):
                raise ConfigError(f"train.{key}", train[key], "allowed: max_steps, overrides")
        if kind == "training":
            check_number("train.max_steps", train.get("max_steps"), low=1, integer=True)
            overrides = train.setdefault("overrides", [])
            if not isinstance(overrides, list) or not all(isinstance(o, (str, int, float)) for o in overrides):
                raise ConfigError("train.overrides", overrides, "expected a list of command-line arguments")
        elif train:
            raise ConfigError("train", train, "only training sweeps train; remove it or set kind: training")
        checkpoint = raw.get("checkpoint")
        if kind == "training" and checkpoint is not None:
            raise ConfigError("checkpoint", checkpoint, "training sweeps train from scratch; remove it")
        mlflow = raw.get("mlflow") or {}
        if not isinstance(mlflow, dict) or set(mlflow) - {"experiment", "tracking_uri"}:
            raise ConfigError("mlflow", mlflow, "expected {experiment: <name>, tracking_uri: <uri or null>}")
        spec = cls(path=str(path), name=name, kind=kind, base=base, search_space=params, storage=storage,
                   direction=direction, sampler=sampler, pruner=pruner, n_trials=n_trials, timeout=timeout,
                   checkpoint=checkpoint, setting=setting, metric=objective.get("metric"), evaluation=evaluation,
                   train=train, constraints=constraints,
                   mlflow_experiment=mlflow.get("experiment", "igdit-sweeps"), tracking_uri=mlflow.get("tracking_uri"))
        spec.objective_metric()  # the base experiment must hold the evaluation the objective reads
        return spec

    def objective_metric(self) -> str:
        """What a trial returns: the base FIDCallback's Fréchet distance (``fd_digits`` or ``fid``, the default)
        or, on Inception features, its Inception Score (``is``; study.direction maximize)."""
        callback = self.evaluation_callback()
        allowed = [callback.metric_name] + (["is"] if callback.feature == "inception" and callback.inception_score
                                            else [])
        metric = self.metric or callback.metric_name
        if metric not in allowed:
            raise ConfigError("objective.metric", metric, "the base FIDCallback logs " + ", ".join(allowed))
        return metric

    def evaluation_callback(self):
        """The FIDCallback every trial is scored with: the base experiment's, with ``evaluation`` put in. A
        sampling trial scores only the objective's setting (the search changes it); a training trial keeps
        all of them, for the record and for the base's checkpoint monitors."""
        from igdit.callbacks import FIDCallback

        args = dict(self.fid_callback())
        if self.kind == "sampling":
            settings = args.get("settings") or {"none": {}}
            args["settings"] = {self.setting: settings.get(self.setting) or {}}
        try:
            return FIDCallback(**(args | self.evaluation))
        except ConfigError as err:
            key = err.field.split(".")[1] if err.field.count(".") == 1 else None
            if key in self.evaluation:
                raise ConfigError(f"evaluation.{key}", err.value, err.allowed) from None
            raise ConfigError(f"base {err.field}", err.value, err.allowed) from None

    def fid_callback(self) -> dict:
        """init_args of the base experiment's FIDCallback (the evaluation protocol of every trial)."""
        base = yaml.safe_load(Path(self.base).read_text()) or {}
        callbacks = (base.get("trainer") or {}).get("callbacks") or []
        found = next((c.get("init_args") or {} for c in callbacks
                      if isinstance(c, dict) and str(c.get("class_path", "")).endswith("FIDCallback")), None)
        if found is None:
            raise ConfigError("base", self.base, "has no igdit.callbacks.FIDCallback in trainer.callbacks; the "
                                                 "objective is its Fréchet distance")
        settings = found.get("settings") or {"none": {}}
        if self.kind == "training" and self.setting not in settings:
            raise ConfigError("objective.setting", self.setting, "the base experiment's FIDCallback evaluates "
                              + ", ".join(settings))
        return found

    def optuna_sampler(self):
        import optuna

        seed = self.sampler["seed"]
        name = self.sampler["name"]
        if name == "grid":
            grid = {p: (s.grid if s.grid is not None else s.choices) for p, s in self.search_space.items()}
            return optuna.samplers.GridSampler(grid, seed=seed)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        startup = self.sampler.get("n_startup_trials", 10)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)

    def optuna_pruner(self):
        import optuna

        if self.pruner["name"] == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=self.pruner.get("n_startup_trials", 2),
                                               n_warmup_steps=self.pruner.get("n_warmup_steps", 0))
        return optuna.pruners.NopPruner()


# ---- MLflow: one parent run per study, one nested run per trial ----------------------------------------
class SweepTracker:
    """Reports a study to MLflow with explicit run ids (no global MLflow state, so several workers and a
    Lightning logger inside a trial can write side by side). Optuna's MLflowCallback logs each trial only
    after it ends and marks failed trials FINISHED; here a trial's run exists while it trains, and a
    failed trial's run is FAILED with its error."""

    def __init__(self, spec: SweepSpec):
        from mlflow.tracking import MlflowClient

        from igdit.tracking import default_artifact_location, default_tracking_uri

        self.uri = spec.tracking_uri or default_tracking_uri()
        self.client = MlflowClient(self.uri)
        experiment = self.client.get_experiment_by_name(spec.mlflow_experiment)
        self.experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            spec.mlflow_experiment, artifact_location=None if spec.tracking_uri else default_artifact_location())
        self.spec = spec
        self.parent_id = self._parent_run()

    def _parent_run(self) -> str:
        """The study's parent run: reused when the study continues, so a study has one parent."""
        tags = f"tags.`igdit.study` = '{self.spec.name}' and tags.`igdit.storage` = '{self.spec.storage}' " \
               "and tags.`igdit.role` = 'study'"
        found = self.client.search_runs([self.experiment_id], filter_string=tags, max_results=1)
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=self.spec.name, tags={
            "igdit.study": self.spec.name, "igdit.storage": self.spec.storage, "igdit.role": "study",
            "igdit.kind": self.spec.kind, "igdit.sweep_file": self.spec.path, "igdit.base": self.spec.base})
        self.client.log_artifact(run.info.run_id, self.spec.path)
        return run.info.run_id

    def start_trial(self, trial) -> str:
        run = self.client.create_run(self.experiment_id, run_name=f"{self.spec.name}-trial-{trial.number}", tags={
            "mlflow.parentRunId": self.parent_id, "igdit.study": self.spec.name, "igdit.role": "trial",
            "igdit.trial": str(trial.number)})
        return run.info.run_id

    def end_trial(self, run_id: str, number: int, state: str, params: dict, value: Optional[float],
                  attrs: dict) -> None:
        self.client.log_batch(run_id, params=[_param(k, v) for k, v in params.items()])
        if value is not None and math.isfinite(value):
            self.client.log_metric(run_id, "objective", value)
        tags = {"igdit.state": state, **{f"igdit.{k}": str(v)[:4000] for k, v in attrs.items()}}
        for key, text in tags.items():
            self.client.set_tag(run_id, key, text)
        self.client.set_terminated(run_id, status="FAILED" if state == "FAIL" else "FINISHED")

    def finish(self, study, interrupted: bool = False) -> Optional[dict]:
        """Best value and parameters (tags and metrics: they change as a study continues) and plots."""
        import optuna

        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        counts = {s: sum(t.state.name == s for t in study.trials) for s in FINISHED}
        self.client.set_tag(self.parent_id, "igdit.trials", " ".join(f"{k.lower()} {v}" for k, v in counts.items()))
        best = None
        if complete:
            trial = study.best_trial
            best = {"value": trial.value, "params": trial.params, "number": trial.number}
            step = len(study.trials)
            self.client.log_metric(self.parent_id, "best_value", trial.value, step=step)
            self.client.set_tag(self.parent_id, "igdit.best_trial", str(trial.number))
            for key, value in trial.params.items():
                self.client.set_tag(self.parent_id, f"best.{key}", str(value))
            self._plots(study, step)
        self.client.set_terminated(self.parent_id, status="KILLED" if interrupted else "FINISHED")
        return best

    def _plots(self, study, step: int) -> None:
        """Optuna's history, importances and contour plots as HTML (plotly) and PNG (matplotlib)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import optuna
        import optuna.visualization as vis
        import optuna.visualization.matplotlib as vis_png

        names = list(self.spec.search_space)
        plots = {"history": lambda m: m.plot_optimization_history(study)}
        if len(names) > 1:
            plots["importances"] = lambda m: m.plot_param_importances(study)
            pairs = [p for p in names if p.endswith(("interval.low", "interval.high"))]
            scale = [p for p in names if p.endswith("scale")]
            shown = (scale[:1] + pairs) if scale and pairs else names
            plots["contour"] = lambda m: m.plot_contour(study, params=shown[:3])
        folder = Path(tempfile.mkdtemp(prefix="igdit-sweep-plots-"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the matplotlib twins
            for name, make in plots.items():
                try:
                    make(vis).write_html(folder / f"{name}.html")
                    axes = make(vis_png)
                    figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
                    figure.savefig(folder / f"{name}.png", dpi=100, bbox_inches="tight")
                    plt.close(figure)
                except (ValueError, RuntimeError, ZeroDivisionError) as err:  # e.g. importances of one trial
                    (folder / f"{name}.txt").write_text(f"not plotted after {step} trials: {err}\n")
        # A fresh folder per call: the plots of an earlier session of the study are kept, not replaced.
        self.client.log_artifacts(self.parent_id, str(folder), artifact_path=f"plots/after-{step}-trials")


def _param(key: str, value: Any):
    from mlflow.entities import Param

    return Param(key, str(value)[:6000])


# ---- trials ------------------------------------------------------------------------------------------
def _check_constraints(spec: SweepSpec, values: dict) -> None:
    import optuna

    for left, op, right in spec.constraints:
        a, b = values[left], values[right]
        if not (a < b if op == "<" else a <= b):
            raise optuna.TrialPruned(f"constraint {left} {op} {right} does not hold ({a} vs {b})")


class SamplingObjective:
    """Scores one guidance setting per trial on a fixed checkpoint (loaded once, with the reference)."""

    def __init__(self, spec: SweepSpec, checkpoint: str):
        from igdit.data import LatentDataModule
        from igdit.metrics.fid import warn_if_singular
        from igdit.sampling import load_module

        import torch

        callback = spec.evaluation_callback()
        self.spec, self.callback = spec, callback
        self.setting_name, self.base_setting = next(iter(callback.settings.items()))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.module = load_module(checkpoint, "--ckpt", device)
        if self.module.data_meta is None:
            raise ConfigError("--ckpt", checkpoint, "carries no shard meta.json, so its samples cannot be decoded")
        self.evaluator = callback.build_evaluator(LatentDataModule(root=self._data_root()), device)
        warn_if_singular(callback.num_samples, self.evaluator.num_features, "evaluation.num_samples")
        metric = spec.objective_metric()
        self.value_key = "is" if metric == "is" else "fd"
        self.metric = f"{metric}/{self.setting_name}"

    def _data_root(self) -> str:
        base = yaml.safe_load(Path(self.spec.base).read_text()) or {}
        return (base.get("data") or {}).get("root", "data/digits")

    def setting(self, values: dict):
        """The base setting with the trial's values put in."""
        from igdit.guidance import parse_guidance_settings

        rules = self.base_setting.describe()
        for path, value in values.items():
            _, rule, *key = path.split(".")
            if key == ["scale"]:
                rules[rule]["scale"] = value
            else:
                interval = list(rules[rule].get("interval", (0.0, 1.0)))
                interval[0 if key[-1] == "low" else 1] = value
                rules[rule]["interval"] = interval
        return parse_guidance_settings({self.setting_name: rules}, "search_space")[self.setting_name]

    def __call__(self, trial, values: dict, run_id: str) -> float:
        from igdit.metrics.evaluate import evaluate_settings

        c = self.callback
        results, _ = evaluate_settings(self.module, {self.setting_name: self.setting(values)}, self.evaluator,
                                       c.num_samples, c.sampler, c.steps, c.labels, c.seed, c.batch_size, grid_size=0)
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
        import optuna

        from igdit.callbacks import FIDCallback

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


class TrainingObjective:
    """Trains the base experiment with the trial's overrides through the Lightning CLI (`igdit fit`'s path)."""

    def __init__(self, spec: SweepSpec):
        self.spec = spec
        self.metric = f"{spec.objective_metric()}/{spec.setting}"

    def arguments(self, values: dict, run_id: Optional[str]) -> list[str]:
        args = ["--config", self.spec.base, *map(str, self.spec.train["overrides"]),
                "--trainer.max_steps", str(self.spec.train["max_steps"])]
        for path, value in values.items():
            args += [f"--{path}", yaml.safe_dump(self.spec.search_space[path].config_value(value),
                                                 default_flow_style=True).strip().removesuffix("...").strip()]
        if run_id is not None:
            args += ["--trainer.logger.init_args.run_id", run_id]
            if self.spec.tracking_uri:
                args += ["--trainer.logger.init_args.tracking_uri", self.spec.tracking_uri]
        return args

    def __call__(self, trial, values: dict, run_id: str) -> float:
        from igdit.cli import run_lightning_cli

        from igdit.callbacks import FIDCallback

        cli = run_lightning_cli(self.arguments(values, run_id), run=False)
        callbacks = cli.trainer.callbacks
        at = next(i for i, c in enumerate(callbacks) if isinstance(c, FIDCallback))
        callbacks[at] = self.spec.evaluation_callback()  # the sweep's evaluation protocol, in the same place
        pruning = OptunaPruning(trial, self.metric)
        callbacks.append(pruning)
        cli.before_fit()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        if pruning.last_value is None:
            raise RuntimeError(f"no {self.metric} was computed in {self.spec.train['max_steps']} steps; let the "
                               "FIDCallback evaluate within train.max_steps (every_n_steps, val_check_interval)")
        return pruning.last_value


# ---- the runner --------------------------------------------------------------------------------------
def latest_checkpoint(base: str) -> Optional[str]:
    """The newest last.ckpt of the base experiment's runs (what `make train` just wrote), if any."""
    cfg = yaml.safe_load(Path(base).read_text()) or {}
    trainer = cfg.get("trainer") or {}
    logger = (trainer.get("logger") or {}).get("init_args") or {}
    folder = Path(trainer.get("default_root_dir", "runs")) / logger.get("experiment_name", "igdit")
    found = sorted(folder.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return str(found[-1]) if found else None


def run_sweep(spec: SweepSpec, checkpoint: Optional[str] = None, n_trials: Optional[int] = None,
              out=sys.stdout) -> dict:
    """Create or continue the study and run its remaining trials; returns a summary dict.

    Trials already finished in the storage (complete, pruned or failed) count against ``n_trials``, so the
    same command run again continues where it stopped; a trial that raises is recorded as failed and the
    study goes on; Ctrl-C ends the running trial as failed, closes the MLflow runs, and re-raises.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    total = n_trials or spec.n_trials
    if spec.kind == "sampling":
        checkpoint = checkpoint or spec.checkpoint or latest_checkpoint(spec.base)
        if checkpoint is None:
            raise ConfigError("checkpoint", None, f"a sampling sweep scores a trained checkpoint; run `make train` "
                                                  f"(CONFIG={spec.base}) first or pass --ckpt")
        objective = SamplingObjective(spec, checkpoint)
    else:
        objective = TrainingObjective(spec)
    study = optuna.create_study(storage=spec.storage, study_name=spec.name, direction=spec.direction,
                                sampler=spec.optuna_sampler(), pruner=spec.optuna_pruner(), load_if_exists=True)
    if study.direction.name.lower() != spec.direction:
        raise ConfigError("study.direction", spec.direction, f"the stored study {spec.name} {study.direction.name.lower()}s")
    study.set_user_attr("kind", spec.kind)
    study.set_user_attr("objective", objective.metric)
    if checkpoint:
        study.set_user_attr("checkpoint", str(Path(checkpoint).resolve()))
    tracker = SweepTracker(spec)
    done = _finished(study)
    remaining = None if total is None else max(0, total - done)
    print(f"study {spec.name} ({spec.kind}, {objective.metric}, {spec.direction}) in {spec.storage}: {done} trial(s) "
          f"finished, {'until the timeout' if remaining is None else f'{remaining} to run'}; MLflow parent run "
          f"{tracker.parent_id} in {tracker.uri}", file=out, flush=True)

    def run_trial(trial) -> float:
        values = {path: param.suggest(trial) for path, param in spec.search_space.items()}
        run_id = tracker.start_trial(trial)
        trial.set_user_attr("mlflow_run_id", run_id)
        start = time.perf_counter()
        state, value, attrs = "FAIL", None, {}
        try:
            _check_constraints(spec, values)
            value = objective(trial, values, run_id)
            if not math.isfinite(value):
                raise FloatingPointError(f"{objective.metric} is {value}")
            state = "COMPLETE"
            return value
        except optuna.TrialPruned as err:
            state, attrs = "PRUNED", {"pruned": str(err)}
            raise
        except (KeyboardInterrupt, SystemExit):
            # Lightning answers Ctrl-C inside fit with exit(1): treat both as the user's interrupt, so that
            # Optuna records the trial as failed instead of leaving it running in the storage.
            attrs = {"error": "interrupted (Ctrl-C)"}
            trial.set_user_attr("interrupted", True)  # not counted as done: the next run redoes its budget
            raise KeyboardInterrupt from None
        except Exception as err:
            attrs = {"error": f"{type(err).__name__}: {' '.join(str(err).split())}"}
            trial.set_user_attr("error", attrs["error"][:1000])
            trial.set_user_attr("traceback", traceback.format_exc()[-3000:])
            raise
        finally:
            seconds = time.perf_counter() - start
            tracker.end_trial(run_id, trial.number, state, values, value, attrs | {"seconds": round(seconds, 2)})
            shown = ", ".join(f"{k}={_short(v)}" for k, v in values.items())
            result = f"{value:.4f}" if value is not None and state == "COMPLETE" else state.lower()
            why = attrs.get("error") or attrs.get("pruned") or ""
            print(f"trial {trial.number:>3}  {result:>10}  {seconds:6.1f} s  {shown}" + (f"  ({why})" if why else ""),
                  file=out, flush=True)

    def stop_when_done(study, _trial) -> None:
        # Optuna's MaxTrialsCallback, except that interrupted trials do not use up the budget. Several workers
        # share a study: each stops once the trials finished by all of them reach the total.
        if total is not None and _finished(study) >= total:
            study.stop()

    interrupted = False
    try:
        if remaining is None or remaining > 0:
            study.optimize(run_trial, n_trials=remaining, timeout=spec.timeout, catch=(Exception,),
                           callbacks=[stop_when_done])
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        best = tracker.finish(study, interrupted)
    summary = {"study": spec.name, "trials": len(study.trials), "best": best, "parent_run_id": tracker.parent_id,
               "tracking_uri": tracker.uri}
    if best:
        print(f"best {objective.metric} {best['value']:.4f} (trial {best['number']}): "
              + ", ".join(f"{k}={_short(v)}" for k, v in best["params"].items()), file=out, flush=True)
    return summary


def _finished(study) -> int:
    """Trials that used up budget: complete, pruned, or failed by an error (not by Ctrl-C)."""
    return sum(t.state.name in FINISHED and not t.user_attrs.get("interrupted") for t in study.trials)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="igdit sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="sweep definition, e.g. sweeps/ig_guidance.yaml")
    parser.add_argument("--ckpt", default=None, help="checkpoint of a sampling sweep (default: the file's "
                        "checkpoint, else the newest runs/<experiment>/*/checkpoints/last.ckpt)")
    parser.add_argument("--n-trials", type=int, default=None, help="total trials of the study (default: the file's)")
    args = parser.parse_args(argv)
    try:
        if args.n_trials is not None:
            check_number("--n-trials", args.n_trials, low=1, integer=True)
        spec = SweepSpec.load(args.sweep)
        run_sweep(spec, args.ckpt, args.n_trials)
    except ConfigError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the running trial is recorded as failed; run the same command again to continue",
              file=sys.stderr)
        return 130
    return 0
