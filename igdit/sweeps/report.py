"""A study in MLflow: one parent run per study (reused when it continues), one nested run per trial."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import optuna

from igdit.config import plain_values
from igdit.sweeps.spec import SweepSpec
from igdit.tracking import log_new_params, open_experiment, provenance_tags

FINISHED = ("COMPLETE", "PRUNED", "FAIL")


class SweepTracker:
    """Reports a study to MLflow with explicit run ids (no global MLflow state, so several workers and a
    Lightning logger inside a trial can write side by side). Optuna's MLflowCallback logs each trial only
    after it ends and marks failed trials FINISHED; here a trial's run exists while it trains, and a
    failed trial's run is FAILED with its error."""

    def __init__(self, spec: SweepSpec):
        self.client, self.experiment_id = open_experiment(spec.tracking_uri, spec.mlflow_experiment)
        self.uri = self.client.tracking_uri  # the default store when the spec names none
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
            **provenance_tags(), "igdit.study": self.spec.name, "igdit.storage": self.spec.storage, "igdit.role": "study",
            "igdit.kind": self.spec.kind, "igdit.sweep_file": self.spec.path, "igdit.base": self.spec.base})
        self.client.log_artifact(run.info.run_id, self.spec.path)
        return run.info.run_id

    def start_trial(self, trial) -> str:
        run = self.client.create_run(self.experiment_id, run_name=f"{self.spec.name}-trial-{trial.number}", tags={
            **provenance_tags(), "mlflow.parentRunId": self.parent_id, "igdit.study": self.spec.name, "igdit.role": "trial",
            "igdit.trial": str(trial.number)})
        return run.info.run_id

    def log_trial_config(self, run_id: str, config: dict) -> None:
        """A trial's resolved configuration (``SamplingTrial.describe``) as params (``evaluation/steps``, ...) and as
        config.yaml. A training trial's Lightning logger records its experiment itself."""
        params = {}

        def flatten(prefix: str, value) -> None:
            if isinstance(value, dict):
                for key, inner in value.items():
                    flatten(f"{prefix}/{key}" if prefix else str(key), inner)
            else:
                params[prefix] = value

        config = plain_values(config)
        flatten("", config)
        log_new_params(self.client, run_id, params)
        self.client.log_dict(run_id, config, "config.yaml")

    def end_trial(self, run_id: str, number: int, state: str, params: dict, value: Optional[float],
                  attrs: dict) -> None:
        log_new_params(self.client, run_id, params)
        if value is not None and math.isfinite(value):
            self.client.log_metric(run_id, "objective", value)
        tags = {"igdit.state": state, **{f"igdit.{k}": str(v)[:4000] for k, v in attrs.items()}}
        for key, text in tags.items():
            self.client.set_tag(run_id, key, text)
        self.client.set_terminated(run_id, status="FAILED" if state == "FAIL" else "FINISHED")

    def close_stale(self, trial) -> None:
        """Close the MLflow run of a trial whose worker died without closing it (the heartbeat found it).

        A worker killed between creating the run and recording its id on the trial leaves no user attribute;
        the run is then found by its tags (parent run and trial number)."""
        run_ids = [trial.user_attrs["mlflow_run_id"]] if "mlflow_run_id" in trial.user_attrs else [
            run.info.run_id for run in self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}' "
                                                    f"and tags.`igdit.trial` = '{trial.number}'")]
        for run_id in run_ids:
            self.client.set_tag(run_id, "igdit.state", "FAIL")
            self.client.set_tag(run_id, "igdit.error", "the worker stopped (killed or preempted); the trial is retried")
            self.client.set_terminated(run_id, status="KILLED")

    def finish(self, study, interrupted: bool = False) -> Optional[dict]:
        """Best value and parameters (tags and metrics: they change as a study continues) and plots."""
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
        """Optuna's history, importances and contour plots (``sweep_figures``), as HTML (plotly) and PNG
        (matplotlib), under plots/after-<n>-trials/: the plots of an earlier session of the study are kept."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        folder = f"plots/after-{step}-trials"
        for name, make in sweep_figures(study, list(self.spec.search_space)).items():
            try:
                self.client.log_figure(self.parent_id, make("plotly"), f"{folder}/{name}.html")
                figure = make("matplotlib")
                self.client.log_figure(self.parent_id, figure, f"{folder}/{name}.png")
                plt.close(figure)
            except (ValueError, RuntimeError, ZeroDivisionError) as err:  # e.g. importances of one trial
                self.client.log_text(self.parent_id, f"not plotted after {step} trials: {err}\n",
                                     f"{folder}/{name}.txt")


def objective_label(study) -> str:
    """The study's metric (``study.set_metric_names``) and which way is better: the plots' axis title."""
    names = getattr(study, "metric_names", None) or ["objective"]
    return f"{names[0]} ({'lower' if study.direction.name == 'MINIMIZE' else 'higher'} is better)"


def most_important(study, names: list[str], count: int = 2) -> list[str]:
    """The ``count`` searched parameters that matter most (Optuna's importances), else the first ones."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # too few trials to rank: the file's order
            ranked = list(optuna.importance.get_param_importances(study))
    except (ValueError, RuntimeError, ZeroDivisionError):
        ranked = []
    ranked += [n for n in names if n not in ranked]
    return ranked[:count]


def sweep_figures(study, names: list[str]) -> dict:
    """{plot name: make(kind)} with kind "plotly" (a plotly figure, the HTML) or "matplotlib" (a Figure laid out
    so that its titles, tick labels and legends lie inside it): the optimisation history and, with several
    parameters, their importances and the contour of the two most important ones (a contour of every pair of
    three or more parameters is a grid of unreadable small panels)."""
    import optuna.visualization as plotly_plots
    import optuna.visualization.matplotlib as matplotlib_plots

    label = objective_label(study)
    plots = {"history": lambda m: m.plot_optimization_history(study, target_name=label)}
    if len(names) > 1:
        plots["importances"] = lambda m: m.plot_param_importances(study, target_name=label)
        pair = most_important(study, names)
        plots["contour"] = lambda m: m.plot_contour(study, params=pair, target_name=label)

    def maker(plot):
        def make(kind: str):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the matplotlib twins
                if kind == "plotly":
                    return plot(plotly_plots)
                axes = plot(matplotlib_plots)
            return _fit_figure((axes.flat[0] if hasattr(axes, "flat") else axes).figure)
        return make

    return {name: maker(plot) for name, plot in plots.items()}


def _fit_figure(figure):
    """Optuna's matplotlib figure at a size where its text reads, laid out inside its frame."""
    axes = [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]
    ticks = max((len(t.get_text()) for ax in axes for t in ax.get_yticklabels()), default=0)
    figure.set_size_inches(max(7.0, 5.0 + 0.09 * ticks), 4.8)
    for ax in axes:
        ax.title.set_fontsize(11)
        legend = ax.get_legend()
        if legend is not None:
            legend.set_loc("best")
    figure.set_layout_engine("tight")  # (constrained layout cannot solve the contour's grid of axes)
    return figure


def finished_trials(study) -> int:
    """Trials that used up budget: complete, pruned, or failed by an error (not by Ctrl-C)."""
    return sum(t.state.name in FINISHED and not t.user_attrs.get("interrupted") for t in study.trials)
