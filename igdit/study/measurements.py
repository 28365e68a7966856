"""A study's measurements on disk: ``measurements.csv`` (every measured number, one row each: arm, seed, step,
setting, metric, value) and ``protocol.json`` beside it (what the numbers were measured under: the study file's
budgets, evaluation protocol and arms, the base experiment's model and data, the commits the runs trained at).

Reading them back lets a study combine seeds trained on different machines or in different sessions: the runs of
another invocation's CSV stand in for runs not trained here, with their FD curves, sampling evaluations and probes as
measured there (their checkpoints are not needed, and not available). The protocol is checked first, so numbers
measured under another protocol are refused rather than pooled.
"""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import yaml

from igdit.config import ConfigError

FIELDS = ["arm", "seed", "step", "setting", "metric", "value"]
PROTOCOL = "protocol.json"


def protocol(spec) -> dict:
    """What a measurement depends on besides the code: the study's budgets, evaluation and probe protocol, claim
    settings, every arm's changes and budget, and the base experiment's model and data sections (its trainer section
    is rewritten by the study). JSON-plain, so that two protocols compare with ``==``."""
    base = yaml.safe_load(Path(spec.base).read_text())
    value = {"study": spec.name, "steps": spec.steps, "evaluate_every": spec.evaluate_every,
             "evaluation": dataclasses.asdict(spec.evaluation), "probe": dataclasses.asdict(spec.probe),
             "claims": dataclasses.asdict(spec.claims),
             "arms": {name: {"set": arm.set, "budget": arm.budget} for name, arm in spec.arms.items()},
             "base": {"model": base.get("model"), "data": base.get("data")}}
    return json.loads(json.dumps(value))


def write_measurements(study, measured: list[dict]) -> Path:
    """measurements.csv and protocol.json in the study's folder: the FD curves every run logged, each run's training
    time, and ``measured`` (the evaluations the claims read: sampling settings, probes)."""
    rows = []
    for (arm, seed), record in sorted(study.records.items(), key=lambda item: (item[0][1], item[0][0])):
        for setting, curve in sorted(record["fd"].items()):
            rows += [{"arm": arm, "seed": seed, "step": int(step), "setting": setting, "metric": "fd_digits",
                      "value": value} for step, value in sorted(curve.items(), key=lambda kv: int(kv[0]))]
        rows.append({"arm": arm, "seed": seed, "step": study.spec.arm_steps(arm), "setting": "",
                     "metric": "train_seconds", "value": record["seconds"]})
    rows += measured
    path = study.folder / "measurements.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    commits = sorted({str(r.get("commit", "unknown")) for r in study.records.values()})
    (study.folder / PROTOCOL).write_text(json.dumps({"protocol": protocol(study.spec), "commits": commits},
                                                    indent=1) + "\n")
    return path


def _first_difference(mine: Any, theirs: Any, path: str = "") -> Optional[tuple[str, Any, Any]]:
    """The first (dotted path, this value, that value) where two JSON values differ, or None."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        for key in sorted(set(mine) | set(theirs)):
            found = _first_difference(mine.get(key), theirs.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    return None if mine == theirs else (path, mine, theirs)


class ImportedRuns:
    """Runs another invocation measured, read from its measurements.csv (``--measurements``): for each (arm, seed)
    a record like a finished run's, whose checkpoints are references into the CSV, and the sampling and probe values
    measured on them. Only the study's arms and seeds are read; the protocol beside each CSV must be this study's."""

    PREFIX = "measured:"

    def __init__(self):
        self.records: dict[tuple[str, int], dict] = {}
        self.values: dict[tuple[str, int, int, str, str], float] = {}  # (arm, seed, step, setting, metric)

    @classmethod
    def load(cls, paths: list[str], spec) -> "ImportedRuns":
        imported = cls()
        for path in paths:
            imported._read(Path(path), spec)
        return imported

    def _read(self, path: Path, spec) -> None:
        field = "--measurements"
        if not path.is_file():
            raise ConfigError(field, str(path), "no such file; expected the measurements.csv a study wrote")
        meta_path = path.parent / PROTOCOL
        if not meta_path.is_file():
            raise ConfigError(field, str(path), f"has no {PROTOCOL} beside it, so what its numbers were measured "
                                                "under cannot be checked; pass the folder of a report that wrote one")
        meta = json.loads(meta_path.read_text())
        theirs, mine = meta["protocol"], protocol(spec)
        shared = set(theirs["arms"]) & set(mine["arms"])  # an arm only one side has is simply not read
        difference = _first_difference(mine | {"arms": {n: a for n, a in mine["arms"].items() if n in shared}},
                                       theirs | {"arms": {n: a for n, a in theirs["arms"].items() if n in shared}})
        if difference:
            where, here, there = difference
            raise ConfigError(field, str(path), f"was measured with {where} = {json.dumps(there)}, this study has "
                                                f"{json.dumps(here)}; numbers of another protocol are not pooled")
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or list(rows[0]) != FIELDS:
            raise ConfigError(field, str(path), f"expected the columns {', '.join(FIELDS)}")
        commit = ", ".join(meta.get("commits") or ["unknown"])
        by_run: dict[tuple[str, int], list[dict]] = {}  # one pass over the file, not one per run
        for r in rows:
            by_run.setdefault((r["arm"], int(r["seed"])), []).append(r)
        runs = sorted(run for run, run_rows in by_run.items() if run[0] in spec.arms and run[1] in spec.seeds
                      and any(r["metric"] == "train_seconds" for r in run_rows))
        for arm, seed in runs:
            if (arm, seed) in self.records:
                raise ConfigError(field, str(path), f"holds {arm} seed {seed} too, which "
                                                    f"{self.records[(arm, seed)]['imported']} already gave")
            mine_rows = by_run[(arm, seed)]
            curves: dict[str, dict[str, float]] = {}
            for r in mine_rows:
                if r["metric"] == "fd_digits":
                    curves.setdefault(r["setting"], {})[str(int(r["step"]))] = float(r["value"])
                elif r["metric"] != "train_seconds":
                    self.values[(arm, seed, int(r["step"]), r["setting"], r["metric"])] = float(r["value"])
            steps = sorted({int(step) for curve in curves.values() for step in curve})
            seconds = next(float(r["value"]) for r in mine_rows if r["metric"] == "train_seconds")
            self.records[(arm, seed)] = {
                "arm": arm, "seed": seed, "run_id": None, "last": self._reference(path, arm, seed, spec.arm_steps(arm)),
                "checkpoints": {str(step): self._reference(path, arm, seed, step) for step in steps},
                "fd": curves, "seconds": seconds, "commit": commit, "imported": str(path)}

    def _reference(self, path: Path, arm: str, seed: int, step: int) -> str:
        return f"{self.PREFIX}{path}#{arm}/{seed}/{step}"

    def owns(self, checkpoint: str) -> bool:
        return checkpoint.startswith(self.PREFIX)

    def _parse(self, checkpoint: str) -> tuple[str, str, int, int]:
        path, run = checkpoint[len(self.PREFIX):].rsplit("#", 1)
        arm, seed, step = run.rsplit("/", 2)
        return path, arm, int(seed), int(step)

    def _value(self, checkpoint: str, setting: str, metric: str, required: bool = True) -> Optional[float]:
        path, arm, seed, step = self._parse(checkpoint)
        value = self.values.get((arm, seed, step, setting, metric))
        if value is None and required:
            raise ConfigError("--measurements", path, f"holds no {metric} of setting '{setting}' for {arm} seed {seed} "
                                                      f"at step {step}; the study reads it (its claims ask for more "
                                                      "than the invocation that wrote the file measured)")
        return value

    def sampled(self, checkpoint: str, settings: dict[str, dict]) -> dict[str, dict]:
        """{setting: {"fd", "nfe", "cost"}} as measured; nfe and cost are None where the file did not keep them."""
        out = {}
        for name in settings:
            nfe = self._value(checkpoint, name, "sampled_nfe", required=False)
            out[name] = {"fd": self._value(checkpoint, name, "sampled_fd"), "nfe": None if nfe is None else int(nfe),
                         "cost": self._value(checkpoint, name, "sampled_cost", required=False)}
        return out

    def probe(self, checkpoint: str, setting: str) -> float:
        return self._value(checkpoint, setting, "probe_accuracy")
