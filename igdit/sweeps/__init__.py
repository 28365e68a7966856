"""Optuna sweeps over the knobs the papers ablate, reported in MLflow (`igdit sweep <file.yaml>`).

spec.py: the sweep file; objectives.py: what a trial does (sampling: score a guidance setting on one checkpoint;
training: train the base experiment); report.py: MLflow; runner.py: create or continue the study and run it.
"""
from igdit.sweeps.trials import OptunaPruning, SamplingTrial, TrainingTrial
from igdit.sweeps.report import SweepTracker, finished_trials
from igdit.sweeps.runner import latest_checkpoint, run_sweep
from igdit.sweeps.spec import ParamSpec, SweepSpec

__all__ = ["OptunaPruning", "ParamSpec", "SamplingTrial", "SweepSpec", "SweepTracker", "TrainingTrial",
           "finished_trials", "latest_checkpoint", "run_sweep"]
