"""Running a study: create or continue it in its storage, run the remaining trials, report them in MLflow."""
from __future__ import annotations

import math
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Optional

import optuna

from igdit.config import ConfigError
from igdit.sweeps.trials import SamplingTrial, TrainingTrial, check_constraints
from igdit.sweeps.report import SweepTracker, finished_trials
from igdit.sweeps.spec import SweepSpec


def study_storage(spec: SweepSpec, tracker: SweepTracker):
    """The study's storage. A database gets Optuna's heartbeat: a trial whose worker was killed (preemption, OOM
    killer) stops beating, is marked failed when any worker next starts a trial, its MLflow run is closed as
    KILLED, and RetryHeartbeatStaleTrialCallback queues its parameters again; without it such a trial stays RUNNING for
    ever. Other storages (a journal file) are used as given."""
    if not spec.storage.split(":", 1)[0].split("+")[0] in ("sqlite", "postgresql", "mysql"):
        return spec.storage
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=spec.max_retry)  # its old name is deprecated

    def close_and_retry(study, trial) -> None:
        tracker.close_stale(trial)
        retry(study, trial)

    return optuna.storages.RDBStorage(spec.storage, heartbeat_interval=spec.heartbeat_interval,
                                      grace_period=spec.grace_period, heartbeat_stale_trial_callback=close_and_retry)


def latest_checkpoint(spec: SweepSpec) -> Optional[str]:
    """The newest last.ckpt of the base experiment's runs (what `make train` just wrote), if any."""
    found = sorted(spec.runs_folder().glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return str(found[-1]) if found else None


def run_sweep(spec: SweepSpec, checkpoint: Optional[str] = None, n_trials: Optional[int] = None,
              out=sys.stdout) -> dict:
    """Create or continue the study and run its remaining trials; returns a summary dict.

    Trials already finished in the storage (complete, pruned or failed) count against ``n_trials``, so the
    same command run again continues where it stopped; a trial that raises is recorded as failed and the
    study goes on; Ctrl-C ends the running trial as failed, closes the MLflow runs, and re-raises.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    total = n_trials or spec.n_trials
    if spec.kind == "sampling":
        checkpoint = checkpoint or spec.checkpoint or latest_checkpoint(spec)
        if checkpoint is None:
            raise ConfigError("checkpoint", None, f"a sampling sweep scores a trained checkpoint; run `make train` "
                                                  f"(CONFIG={spec.base}) first or pass --ckpt")
        objective = SamplingTrial(spec, checkpoint)
    else:
        objective = TrainingTrial(spec)
    tracker = SweepTracker(spec)
    study = optuna.create_study(storage=study_storage(spec, tracker), study_name=spec.name, direction=spec.direction,
                                pruner=spec.optuna_pruner(), load_if_exists=True)
    study.sampler = spec.optuna_sampler(finished=len(study.trials))
    if study.direction.name.lower() != spec.direction:
        raise ConfigError("study.direction", spec.direction, f"the stored study {spec.name} {study.direction.name.lower()}s")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([objective.metric])  # what optuna-dashboard and the plots call the objective
    study.set_user_attr("kind", spec.kind)
    study.set_user_attr("objective", objective.metric)
    if checkpoint:
        study.set_user_attr("checkpoint", str(Path(checkpoint).resolve()))
    done = finished_trials(study)
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
            check_constraints(spec, values)
            if hasattr(objective, "describe"):
                tracker.log_trial_config(run_id, objective.describe(values))
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
        if total is not None and finished_trials(study) >= total:
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


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
