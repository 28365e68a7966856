"""The study file (``experiments/studies/reproduce.yaml``): arms, seeds, budgets and the evaluation protocol.

An arm is the base experiment with changes (``set``: dotted paths of the experiment YAML -> values). A value
``${checkpoint:<arm>}`` is the last checkpoint of that arm's run with the same seed (a Self-Transcendence teacher,
an Autoguidance guide), so that arm trains first. ``quick`` lists what QUICK=1 changes (fewer arms, one seed,
shorter runs) for a first look.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt

from igdit.config import ConfigError, build, check_interval
from igdit.generation import Sampling

REFERENCE = re.compile(r"^\$\{checkpoint:([\w.-]+)\}$")


@dataclass
class Arm:
    """One training recipe: changes to the base experiment, and its share of the study's step budget (a teacher or
    a guide trains for less), rounded to whole evaluation intervals."""

    set: dict[str, Any] = field(default_factory=dict)
    budget: PositiveFloat = 1.0

    def needs(self) -> list[str]:
        """The arms whose checkpoints this arm reads (``${checkpoint:<arm>}`` anywhere in its changes)."""
        found: list[str] = []
        resolve_references(self.set, lambda arm: found.append(arm) or arm)
        return found


def resolve_references(value: Any, checkpoint_of) -> Any:
    """``value`` with every ``${checkpoint:<arm>}`` string, at any depth, replaced by ``checkpoint_of(arm)``."""
    if isinstance(value, dict):
        return {k: resolve_references(v, checkpoint_of) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_references(v, checkpoint_of) for v in value]
    match = REFERENCE.match(value) if isinstance(value, str) else None
    return checkpoint_of(match.group(1)) if match else value


@dataclass
class Evaluation:
    """The FIDCallback protocol every run and every sampling claim uses (digits feature network, train split)."""

    num_samples: PositiveInt = 500
    sampler: str = "heun"
    steps: PositiveInt = 5
    ig_scale: PositiveFloat = 2.0
    cfg_scale: PositiveFloat = 1.5
    cfg_interval: tuple[float, float] = (0.0, 0.7)
    ag_scale: PositiveFloat = 1.5
    heatmap_scales: list[PositiveFloat] = field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0])
    heatmap_intervals: list[tuple[float, float]] = field(default_factory=lambda: [(0.0, 1.0), (0.3, 1.0)])


@dataclass
class Probe:
    """Linear probe of block features (the representation claim): logistic regression on the mean-pooled tokens of
    ``block`` at time ``t`` (t = 1 noise), fit on the train split, scored on the val split."""

    block: PositiveInt = 3
    t: float = 0.3
    train_samples: PositiveInt = 1000

    def setting(self) -> str:
        """The probe's name in measurements.csv's ``setting`` column."""
        return f"block{self.block}_t{self.t:g}"


@dataclass
class WhereIGActs:
    """Claim 3's test, fixed before any run: IG at ``scale`` on ``interval`` against the same scale on ``against``
    (t = 1 is noise), paired on the same checkpoints. Defaults: the paper's best SiT-B/2 setting (w 2.3 on [0.3, 1])
    against every step. The heat-map over ``evaluation.heatmap_*`` is drawn beside it and tests nothing."""

    scale: PositiveFloat = 2.3
    interval: tuple[float, float] = (0.3, 1.0)
    against: tuple[float, float] = (0.0, 1.0)


@dataclass
class ClaimSettings:
    where_ig_acts: WhereIGActs = field(default_factory=WhereIGActs)


@dataclass
class Quick:
    arms: Optional[list[str]] = None
    seeds: Optional[list[NonNegativeInt]] = None
    steps: Optional[PositiveInt] = None
    evaluate_every: Optional[PositiveInt] = None
    num_samples: Optional[PositiveInt] = None


@dataclass
class StudyFile:
    name: str
    base: str
    arms: dict[str, Arm]
    results: str = "results/reproduction"
    seeds: list[NonNegativeInt] = field(default_factory=lambda: [0, 1, 2])
    steps: PositiveInt = 1000
    evaluate_every: PositiveInt = 250
    evaluation: Evaluation = field(default_factory=Evaluation)
    probe: Probe = field(default_factory=Probe)
    mlflow_experiment: str = "igdit-reproduction"
    tracking_uri: Optional[str] = None
    quick: Quick = field(default_factory=Quick)
    alpha: float = 0.05
    claims: ClaimSettings = field(default_factory=ClaimSettings)


# Words that ask for a comparison to be chosen from the results (the cell that did best on the seeds it is then tested
# on): refused, since a test of the winner of 16 cells on the same seeds is biased toward "holds".
_CHOSEN_AFTER = ("best", "min", "max", "selected", "select", "auto", "argmin", "argmax")


def _refuse_choice_after_the_fact(raw: dict) -> None:
    settings = ((raw.get("claims") or {}).get("where_ig_acts") or {}) if isinstance(raw.get("claims"), dict) else {}
    for key in ("scale", "interval", "against"):
        value = settings.get(key) if isinstance(settings, dict) else None
        if isinstance(value, str) or (isinstance(value, list) and any(isinstance(v, str) for v in value)):
            chosen = value if isinstance(value, str) else next(v for v in value if isinstance(v, str))
            why = ("comparisons are fixed before the runs: give the number to test (e.g. the paper's scale 2.3 and "
                   "interval [0.3, 1.0]); a cell chosen on the seeds it is then tested on biases the test toward "
                   "'holds'") if chosen.strip().lower() in _CHOSEN_AFTER else "expected a number"
            raise ConfigError(f"claims.where_ig_acts.{key}", value, why)


class StudySpec:
    """A loaded, validated study file; ``quick=True`` applies its ``quick`` section."""

    def __init__(self, path: str, file: StudyFile, quick: bool = False, seeds: Optional[list[int]] = None,
                 only_arms: Optional[list[str]] = None):
        self.path, self.quick = str(path), quick
        if not Path(file.base).is_file():
            raise ConfigError("base", file.base, "expected the path of an experiment YAML, e.g. experiments/default.yaml")
        if not file.seeds or len(set(file.seeds)) != len(file.seeds):
            raise ConfigError("seeds", file.seeds, "expected distinct seeds")
        q = file.quick if quick else Quick()
        self.name, self.base, self.results = file.name, file.base, Path(file.results) / ("quick" if quick else "full")
        # plain ints (the parser's restricted types do not survive yaml.safe_dump into a run's config)
        self.seeds = [int(s) for s in (q.seeds or file.seeds)]
        if seeds:  # a first pass over some of the seeds; the runs land where the whole study reads them back
            unknown = [s for s in seeds if s not in self.seeds]
            if unknown or len(set(seeds)) != len(seeds):
                raise ConfigError("--seeds", seeds, f"expected distinct seeds of the study's {self.seeds}")
            self.seeds = [int(s) for s in seeds]
        self.seeds_subset = bool(seeds)
        self.steps, self.evaluate_every = int(q.steps or file.steps), int(q.evaluate_every or file.evaluate_every)
        self.evaluation, self.probe = file.evaluation, file.probe
        Sampling.checked("evaluation.", self.evaluation.sampler, self.evaluation.steps)
        if not 0 < file.alpha < 0.5:
            raise ConfigError("alpha", file.alpha, "expected a test level in (0, 0.5), e.g. 0.05")
        self.alpha, self.claims = float(file.alpha), file.claims
        where = self.claims.where_ig_acts
        where.interval = check_interval("claims.where_ig_acts.interval", where.interval)
        where.against = check_interval("claims.where_ig_acts.against", where.against)
        if where.interval == where.against:
            raise ConfigError("claims.where_ig_acts.against", list(where.against),
                              "must differ from claims.where_ig_acts.interval: the claim compares two intervals")
        if q.num_samples:
            self.evaluation.num_samples = q.num_samples
        self.mlflow_experiment, self.tracking_uri = file.mlflow_experiment, file.tracking_uri
        names = only_arms or q.arms or list(file.arms)
        unknown = [a for a in names if a not in file.arms]
        if unknown:
            raise ConfigError("--arms" if only_arms else "quick.arms", unknown[0],
                              "expected arms of the study: " + ", ".join(file.arms))
        self.arms_subset = bool(only_arms)  # a part of the study: these arms and those they read checkpoints of
        self.arms = {}
        for name in _in_dependency_order(file.arms, names):
            self.arms[name] = file.arms[name]
        if self.steps % self.evaluate_every:
            raise ConfigError("steps", self.steps, f"must be a multiple of evaluate_every ({self.evaluate_every})")

    @classmethod
    def load(cls, path: str, quick: bool = False, seeds: Optional[list[int]] = None,
             only_arms: Optional[list[str]] = None) -> "StudySpec":
        if not Path(path).is_file():
            raise ConfigError("study", path, "is not a file; pass a study definition such as experiments/studies/reproduce.yaml")
        raw = yaml.safe_load(Path(path).read_text())
        if not isinstance(raw, dict):
            raise ConfigError("study", path, "expected a mapping with name, base, arms, ...")
        arms = raw.get("arms")
        if not isinstance(arms, dict) or not arms:
            raise ConfigError("arms", arms, "expected a mapping of arm names to {set: {...}, budget: ...}")
        changes = {}
        for name, arm in arms.items():  # each arm on its own, so an error names it
            arm = dict(arm or {})
            changes[name] = arm.pop("set", {}) or {}
            if not isinstance(changes[name], dict) or not all(isinstance(k, str) for k in changes[name]):
                raise ConfigError(f"arms.{name}.set", changes[name], "expected a mapping of dotted experiment "
                                                                     "paths to values")
            arms[name] = vars(build(Arm, arm, f"arms.{name}"))
        _refuse_choice_after_the_fact(raw)
        file = build(StudyFile, raw | {"arms": arms})
        for name, arm in file.arms.items():  # the changes stay plain YAML values (the parser would build parts)
            arm.set = copy.deepcopy(changes[name])
        return cls(path, file, quick, seeds, only_arms)

    def arm_steps(self, name: str) -> int:
        """The arm's training steps: its budget share of ``steps``, in whole evaluation intervals (at least one)."""
        intervals = max(1, round(self.arms[name].budget * self.steps / self.evaluate_every))
        return intervals * self.evaluate_every


def _in_dependency_order(arms: dict[str, Arm], wanted: list[str]) -> list[str]:
    """``wanted`` and the arms they read checkpoints of, each after what it needs."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name not in arms:
            raise ConfigError(f"arms.{path[-1]}.set", f"${{checkpoint:{name}}}", "names no arm of the study")
        if name in path:
            raise ConfigError(f"arms.{name}.set", name, "reads its own checkpoint through " + " -> ".join(path))
        for needed in arms[name].needs():
            visit(needed, path + (name,))
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order
