"""The sweep file (``sweeps/*.yaml``): what to search, how to score it, where the study lives. Validated on load.

    study:
      name: ig_guidance_digits
      storage: sqlite:///optuna.db          # postgresql://... for many workers on many machines
      direction: minimize
      sampler: {class_path: optuna.samplers.TPESampler, init_args: {seed: 0, n_startup_trials: 8}}
      pruner: {class_path: optuna.pruners.MedianPruner}   # training sweeps
      n_trials: 24                           # and/or timeout: <seconds>
    kind: sampling                           # sampling: score one checkpoint | training: train each trial
    base: experiments/default.yaml
    objective: {setting: ig}                 # the base FIDCallback's setting (and metric: fd_digits|fid|is)
    evaluation: {num_samples: 1000}          # changes to the base FIDCallback's protocol
    search_space:
      guidance.ig.scale: {type: float, low: 1.0, high: 3.5}
    constraints: ["guidance.ig.interval.low < guidance.ig.interval.high"]

The file is parsed by jsonargparse, like an experiment: Optuna's samplers and pruners are chosen by ``class_path``
with ``init_args``; the base experiment is parsed once, through the Lightning CLI's parser
(``igdit.experiment.parse_experiment``). Sampling sweeps search the fields of the guidance rules
(``guidance.<rule>.<field>``, ``guidance.<rule>.interval.low|high``); training sweeps search experiment fields
(``model.*``, ``data.*``, ``trainer.*``). Every parameter's extreme values are tried through the same checks a
trial will meet, so a search space that can produce an invalid value is refused when the file loads.
"""
from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import optuna
import torch
import yaml
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt

from igdit.callbacks import FIDCallback
from igdit.config import ConfigError, build, instantiate, one_line
from igdit.distributed import device_count
from igdit.experiment import experiment_config, parse_experiment
from igdit.guidance import RULES, build_rules, describe
from igdit.module import build_module

EVALUATION_KEYS = ("num_samples", "sampler", "steps", "schedule", "labels", "seed", "batch_size", "every_n_steps")
CONSTRAINT = re.compile(r"^\s*([\w.]+)\s*(<=|<)\s*([\w.]+)\s*$")
Scalar = Union[bool, int, float, str, None]


@dataclass
class ParamSpec:
    """One searched config path: float/int in [low, high] (log scale, step) or categorical choices; ``grid`` lists
    the values a grid sampler visits; ``as_list`` passes an int as [int] (``model.backbone.exits``)."""

    type: Literal["float", "int", "categorical"]
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[PositiveFloat] = None
    choices: Optional[list[Scalar]] = None
    grid: Optional[list[Scalar]] = None
    as_list: bool = False
    path: str = ""

    def check(self, field_: str) -> "ParamSpec":
        """Cross-field checks (the types are checked by the parser)."""
        if self.type == "categorical":
            if not self.choices:
                raise ConfigError(f"{field_}.choices", self.choices, "expected a non-empty list of values")
        else:
            integer = self.type == "int"
            for key in ("low", "high"):
                value = getattr(self, key)
                if value is None or (integer and not float(value).is_integer()):
                    raise ConfigError(f"{field_}.{key}", value, f"expected {'an integer' if integer else 'a number'}")
            if self.high < self.low:
                raise ConfigError(f"{field_}.high", self.high, f"expected >= low ({self.low})")
            if self.log and self.low <= 0:
                raise ConfigError(f"{field_}.low", self.low, "a log scale needs low > 0")
        if self.grid is not None:
            for value in self.grid:
                inside = value in self.choices if self.type == "categorical" else (
                    isinstance(value, (int, float)) and self.low <= value <= self.high)
                if not inside:
                    raise ConfigError(f"{field_}.grid", value, "every grid value must lie in the parameter's range")
        return self

    def suggest(self, trial) -> Any:
        """The trial's value (a grid sampler returns one of ``grid``; the name is the config path)."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.path, self.choices)
        if self.type == "int":
            return trial.suggest_int(self.path, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.path, float(self.low), float(self.high), step=self.step, log=self.log)

    def extremes(self) -> list:
        """The values that bound what a trial can draw (to be checked when the file loads)."""
        values = self.choices if self.type == "categorical" else [self.low, self.high]
        if self.type == "int":
            values = [int(v) for v in values]
        return list(values) + [v for v in (self.grid or []) if v not in values]

    def config_value(self, value: Any) -> Any:
        return [value] if self.as_list else value


@dataclass
class StudySpec:
    """Where the study lives and how Optuna searches it (sampler and pruner by class_path, unbuilt here)."""

    name: str
    storage: str = "sqlite:///optuna.db"
    direction: Literal["minimize", "maximize"] = "minimize"
    sampler: Optional[dict] = None
    pruner: Optional[dict] = None
    n_trials: Optional[PositiveInt] = None
    timeout: Optional[PositiveFloat] = None
    heartbeat_interval: PositiveInt = 60
    grace_period: Optional[PositiveInt] = None
    max_retry: NonNegativeInt = 2


@dataclass
class TrainSpec:
    """Training sweeps: steps per trial and extra command-line arguments for every trial."""

    max_steps: Optional[PositiveInt] = None
    overrides: list[str] = field(default_factory=list)


@dataclass
class MlflowSpec:
    experiment: str = "igdit-sweeps"
    tracking_uri: Optional[str] = None


@dataclass
class TrialScore:
    """What a trial is scored by (the sweep file's ``objective:``): a guidance setting's Fréchet metric."""

    setting: str = "none"
    metric: Optional[Literal["fd_digits", "fid", "is"]] = None


@dataclass
class SweepFile:
    """The fields of a sweep file, as the parser checks them."""

    study: StudySpec
    kind: Literal["sampling", "training"]
    base: str
    search_space: dict[str, ParamSpec]
    objective: TrialScore = field(default_factory=TrialScore)
    evaluation: dict[str, Any] = field(default_factory=dict)
    train: Optional[TrainSpec] = None
    checkpoint: Optional[str] = None
    constraints: list[str] = field(default_factory=list)
    mlflow: MlflowSpec = field(default_factory=MlflowSpec)


class SweepSpec:
    """A loaded, validated sweep file (``SweepSpec.load(path)``)."""

    def __init__(self, path: str, file: SweepFile):
        self.path, f = str(path), file
        study = f.study
        if not re.match(r"^[\w.-]+$", study.name):
            raise ConfigError("study.name", study.name, "expected a name of letters, digits, '_', '.', '-'")
        if "://" not in study.storage:
            raise ConfigError("study.storage", study.storage, "expected an Optuna storage URL such as "
                                                              "sqlite:///optuna.db or postgresql://user@host/db")
        self.name, self.storage, self.direction = study.name, study.storage, study.direction
        self.kind, self.base, self.checkpoint = f.kind, f.base, f.checkpoint
        self.n_trials, self.timeout = study.n_trials, study.timeout
        self.heartbeat_interval, self.grace_period, self.max_retry = (study.heartbeat_interval, study.grace_period,
                                                                      study.max_retry)
        self.setting, self.metric = f.objective.setting, f.objective.metric
        self.mlflow_experiment, self.tracking_uri = f.mlflow.experiment, f.mlflow.tracking_uri
        if not Path(self.base).is_file():
            raise ConfigError("base", self.base, "expected the path of an experiment YAML, e.g. experiments/default.yaml")
        if not f.search_space:
            raise ConfigError("search_space", f.search_space, "expected at least one parameter")
        self.search_space = {}
        for path, param in f.search_space.items():
            param.path = path
            self.search_space[path] = param.check(f"search_space.{path}")
        for key in f.evaluation:
            if key not in EVALUATION_KEYS or (key == "every_n_steps" and self.kind == "sampling"):
                raise ConfigError(f"evaluation.{key}", f.evaluation[key], "allowed: " + ", ".join(
                    k for k in EVALUATION_KEYS if self.kind == "training" or k != "every_n_steps"))
        self.evaluation = dict(f.evaluation)
        if self.kind == "training":
            if f.train is None or f.train.max_steps is None:
                raise ConfigError("train.max_steps", None, "a training sweep trains every trial for max_steps")
            if self.checkpoint is not None:
                raise ConfigError("checkpoint", self.checkpoint, "training sweeps train from scratch; remove it")
        elif f.train is not None:
            raise ConfigError("train", vars(f.train), "only training sweeps train; remove it or set kind: training")
        self.train = f.train
        self.sampler = f.study.sampler or {"class_path": "optuna.samplers.TPESampler",
                                           "init_args": {"seed": 0, "constant_liar": True}}
        self.pruner = f.study.pruner or {"class_path": "optuna.pruners.NopPruner"}
        self.constraints = []
        for i, text in enumerate(f.constraints):
            match = CONSTRAINT.match(text)
            if not match or match.group(1) not in self.search_space or match.group(3) not in self.search_space:
                raise ConfigError(f"constraints[{i}]", text, "expected '<path> < <path>' or '<=' between two "
                                                             "search_space paths")
            self.constraints.append((match.group(1), match.group(2), match.group(3)))
        if self.is_grid():
            missing = [p for p, s in self.search_space.items() if s.grid is None and s.type != "categorical"]
            if missing:
                raise ConfigError(f"search_space.{missing[0]}.grid", None, "a grid sampler needs explicit grid values "
                                                                          "for every float/int parameter")
            if self.n_trials is None:
                self.n_trials = math.prod(len(s.grid or s.choices) for s in self.search_space.values())
        if self.n_trials is None and self.timeout is None:
            raise ConfigError("study.n_trials", None, "set n_trials or timeout (or use a grid sampler)")
        self.optuna_sampler(0), self.optuna_pruner()  # their class_path and init_args are checked now
        self.experiment = self._parse_base()
        self.metric_name = self.objective_metric()
        self._check_search_space()

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
        space = raw.get("search_space")
        if isinstance(space, dict):  # each parameter on its own, so an error names its path
            raw = raw | {"search_space": {p: vars(build(ParamSpec, s, f"search_space.{p}")) if isinstance(s, dict) else s
                                          for p, s in space.items()}}
        file = build(SweepFile, raw)
        return cls(path, file)

    # ---- Optuna's parts, by class_path ------------------------------------------------------------------
    def is_grid(self) -> bool:
        return self.sampler["class_path"].rsplit(".", 1)[-1] == "GridSampler"

    def optuna_sampler(self, finished: int):
        """The sampler, built from its class_path and init_args. A grid sampler gets the search space's grids.
        A seeded sampler is re-seeded with seed + ``finished`` (trials already in the study), so a study that
        continues after a restart draws new parameters instead of replaying the ones it has."""
        args = dict(self.sampler.get("init_args") or {})
        if self.is_grid():
            args.setdefault("search_space", {p: (s.grid if s.grid is not None else s.choices)
                                             for p, s in self.search_space.items()})
        if args.get("seed") is not None:
            args["seed"] = int(args["seed"]) + finished
        return instantiate(optuna.samplers.BaseSampler, {"class_path": self.sampler["class_path"], "init_args": args},
                           "study.sampler")

    def optuna_pruner(self):
        return instantiate(optuna.pruners.BasePruner, self.pruner, "study.pruner")

    # ---- the base experiment and its evaluation -----------------------------------------------------------
    def _parse_base(self):
        try:
            return parse_experiment(self.base)
        except Exception as err:  # the experiment's own one-line error, named as the sweep's base
            raise ConfigError("base", self.base, one_line(err)) from None

    def fid_callback(self) -> dict:
        """init_args of the base experiment's FIDCallback (the evaluation protocol of every trial)."""
        callbacks = self.experiment.trainer.callbacks or []
        found = next((c for c in callbacks if str(c.class_path).endswith("FIDCallback")), None)
        if found is None:
            raise ConfigError("base", self.base, "has no igdit.callbacks.FIDCallback in trainer.callbacks; the "
                                                 "objective is its Fréchet distance")
        args = {k: (v.as_dict() if hasattr(v, "as_dict") else v) for k, v in vars(found.init_args).items()}
        settings = args.get("settings") or {"none": {}}
        if self.setting not in settings and self.kind == "training":
            raise ConfigError("objective.setting", self.setting, "the base experiment's FIDCallback evaluates "
                              + ", ".join(settings))
        return args

    def evaluation_callback(self):
        """The FIDCallback every trial is scored with: the base experiment's, with ``evaluation`` put in. A
        sampling trial scores only the objective's setting (the search changes it); a training trial keeps
        all of them, for the record and for the base's checkpoint monitors."""
        args = self.fid_callback()
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

    def data_root(self) -> str:
        return str(self.experiment.data.root)

    def runs_folder(self) -> Path:
        """Where the base experiment's runs land: <trainer.default_root_dir>/<experiment name>."""
        trainer = self.experiment.trainer
        logger = trainer.logger
        name = getattr(getattr(logger, "init_args", None), "experiment_name", None) or "igdit"
        return Path(trainer.default_root_dir or "runs") / name

    # ---- the search space, checked at its bounds ----------------------------------------------------------
    def _check_search_space(self) -> None:
        if self.kind == "sampling":
            self._check_guidance_paths()
        else:
            self._check_training_paths()
            self.experiment = parse_experiment(self.base, self.trial_arguments({}))  # the trials' own settings
            self._check_single_process()

    def _check_guidance_paths(self) -> None:
        for path, param in self.search_space.items():
            parts = path.split(".")
            rule = RULES.get(parts[1]) if len(parts) >= 3 and parts[0] == "guidance" else None
            fields = set(inspect.signature(rule.__init__).parameters) - {"self"} if rule else set()
            ok = rule is not None and (parts[2:] in (["interval", "low"], ["interval", "high"])
                                       or (len(parts) == 3 and parts[2] in fields - {"interval"}))
            if not ok:
                raise ConfigError(f"search_space.{path}", param.type,
                                  "sampling sweeps search guidance.<rule>.<field> or guidance.<rule>.interval.low|high "
                                  "with rules " + ", ".join(RULES))
            base = self.evaluation_callback().settings[self.setting]
            for value in param.extremes():
                try:
                    self.setting_rules(base, {path: value})
                except ConfigError as err:
                    raise ConfigError(f"search_space.{path}", value, f"a trial could draw it and {err.field}: "
                                                                     f"{err.allowed}") from None

    def setting_rules(self, base_rules: list, values: dict) -> list:
        """The base setting's rules with a trial's values put in (``guidance.<rule>.<field>`` paths)."""
        spec = {key: {k: v for k, v in d.items()} for key, d in describe(base_rules).items()}
        for path, value in values.items():
            _, rule, *key = path.split(".")
            fields = spec.setdefault(rule, {})
            if key[0] == "interval":
                interval = list(fields.get("interval", (0.0, 1.0)))
                interval[0 if key[-1] == "low" else 1] = value
                fields["interval"] = interval
            else:
                fields[key[0]] = value
        return build_rules(spec, "guidance")

    def _check_single_process(self) -> None:
        """A training sweep runs its trials inside this process: a base that asks for several devices or nodes
        would have Lightning's launcher start copies of the whole sweep."""
        trainer = self.experiment.trainer
        count = device_count(trainer.devices)  # None: auto or -1, all visible devices
        if count is None:
            count = torch.cuda.device_count() if trainer.accelerator in ("auto", "gpu", "cuda") else 1
        if count > 1 or (trainer.num_nodes or 1) > 1:
            raise ConfigError("base trainer.devices", trainer.devices, "a training sweep trains each trial in this "
                              "process: run the base on one device (add --trainer.devices 1 --trainer.num_nodes 1 "
                              "to train.overrides), or start one sweep worker per GPU against the same storage")

    def _check_training_paths(self) -> None:
        for path, param in self.search_space.items():
            if path.split(".")[0] not in ("model", "data", "trainer", "seed_everything"):
                raise ConfigError(f"search_space.{path}", param.type,
                                  "training sweeps search experiment fields (model.*, data.*, trainer.*)")
            for value in param.extremes():
                try:
                    # parsed as `igdit fit` parses it, and the model built on the meta device (no memory, no compute):
                    # a value only the model can refuse (an exit block outside the backbone) fails here, not in a trial
                    config = experiment_config(self.base, self.trial_arguments({path: value}))
                    with torch.device("meta"):
                        build_module(config["model"])
                except SystemExit:
                    raise
                except Exception as err:
                    raise ConfigError(f"search_space.{path}", value, "a trial could draw it and the experiment "
                                                                     f"refuses it: {one_line(err)}") from None

    def trial_arguments(self, values: dict) -> list[str]:
        """Command-line overrides of the base experiment for one training trial."""
        args = [*map(str, self.train.overrides), "--trainer.max_steps", str(self.train.max_steps)]
        for path, value in values.items():
            args += [f"--{path}", yaml.safe_dump(self.search_space[path].config_value(value),
                                                 default_flow_style=True).strip().removesuffix("...").strip()]
        return args
