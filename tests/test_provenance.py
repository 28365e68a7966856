"""What every MLflow run records about where its numbers come from, and where its artifacts go."""
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_provenance_names_the_checkout_commit_and_the_versions():
    from importlib.metadata import version

    from igdit.tracking import provenance, provenance_tags

    found = provenance()
    tags = provenance_tags("fit")
    assert tags["versions.torch"] == version("torch") and tags["versions.igdit"] == version("igdit")
    assert tags["versions.lightning"] == version("lightning") and tags["igdit.role"] == "fit"
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if head.returncode == 0 and Path(head.stdout.strip()).resolve() == REPO:  # this checkout is igdit's repository
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert tags["mlflow.source.git.commit"] == found["git_commit"] == sha.strip()
        assert tags["igdit.git_dirty"] in ("true", "false") and found["commit"].startswith(sha.strip())
    else:  # an installed copy: no commit is claimed
        assert "mlflow.source.git.commit" not in tags and found["commit"] == "unknown"


def test_trainer_settings_become_params_and_a_resumed_run_keeps_its_first_values(tmp_path):
    from mlflow.tracking import MlflowClient

    from igdit.tracking import log_new_params, open_experiment, trainer_params

    config = {"seed_everything": 3, "trainer": {
        "max_steps": 40, "precision": "bf16-mixed", "devices": 2, "num_nodes": 1, "strategy": "ddp",
        "logger": {"class_path": "igdit.tracking.MLflowLogger"}, "gradient_clip_val": None,
        "callbacks": [{"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging"},
                      {"class_path": "igdit.callbacks.SampleGrid", "init_args": {"steps": 4}}]}}
    params = trainer_params(config)
    assert params == {"trainer/max_steps": 40, "trainer/precision": "bf16-mixed", "trainer/devices": 2,
                      "trainer/num_nodes": 1, "trainer/strategy": "ddp", "seed_everything": 3,
                      "trainer/callbacks": ["EMAWeightAveraging", "SampleGrid"]}
    client, experiment = open_experiment(f"sqlite:///{tmp_path / 'store.db'}", "x")
    run = client.create_run(experiment).info.run_id
    assert log_new_params(client, run, params) == params
    resumed = trainer_params(config | {"trainer": config["trainer"] | {"max_steps": 80, "accumulate_grad_batches": 2}})
    assert log_new_params(client, run, resumed) == {"trainer/accumulate_grad_batches": 2}  # MLflow refuses a change
    logged = MlflowClient(f"sqlite:///{tmp_path / 'store.db'}").get_run(run).data.params
    assert logged["trainer/max_steps"] == "40" and logged["trainer/precision"] == "bf16-mixed"


def test_artifacts_go_beside_the_sqlite_store_the_user_names(tmp_path, monkeypatch):
    from igdit.tracking import MLflowLogger, default_artifact_location, open_experiment

    store = tmp_path / "x" / "store.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    logger = MLflowLogger(experiment_name="beside")
    assert logger._artifact_location == (tmp_path / "x" / "mlartifacts").as_uri()
    logger.log_hyperparams({"a": 1})  # the run and its store exist now
    experiment = logger.experiment.get_experiment_by_name("beside")
    assert experiment.artifact_location == (tmp_path / "x" / "mlartifacts").as_uri()
    assert not (Path.cwd() / "mlartifacts").exists() and not (Path.cwd() / "mlruns").exists()
    # the study's and the sweep's stores: the same rule, also for a store named in their file
    client, experiment_id = open_experiment(f"sqlite:///{tmp_path / 'y' / 'other.db'}", "study")
    assert client.get_experiment(experiment_id).artifact_location == (tmp_path / "y" / "mlartifacts").as_uri()
    assert default_artifact_location("http://mlflow.cluster:5000") is None  # a server's own artifact root


class _Logger:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, metrics))


@pytest.mark.parametrize("steps,every,logged", [(20, 25, [(19, {"train/loss": 2.5})]), (50, 25, []),
                                                (41, 5, [(40, {"train/loss": 2.5})])])
def test_the_last_steps_losses_are_logged_whatever_log_every_n_steps_is(steps, every, logged):
    from igdit.callbacks import FinalStepMetrics

    trainer = SimpleNamespace(global_step=steps, log_every_n_steps=every, logger=_Logger(),
                              callback_metrics={"train/loss": torch.tensor(2.5), "val/loss": torch.tensor(1.0)})
    FinalStepMetrics().on_train_end(trainer, None)
    assert trainer.logger.logged == logged  # at Lightning's step of the last batch; nothing twice


def test_model_summary_has_no_empty_flops_column_and_says_what_a_step_costs(caplog):
    import logging

    from lightning.pytorch.utilities.model_summary import summarize

    from helpers import tiny_module
    from igdit.callbacks import ModelSummary

    module = tiny_module()
    summary = ModelSummary(max_depth=1)
    summary.step_flops, summary.batch = module.training_flops(8), 8
    data = summarize(module, max_depth=1)
    with caplog.at_level(logging.INFO):
        summary.summarize(data._get_summary_data(), data.total_parameters, data.trainable_parameters,
                          data.model_size, data.total_training_modes, data.total_flops)
    assert "| Params" in caplog.text and "FLOPs" in caplog.text
    assert "| FLOPs" not in caplog.text and "Total Flops" not in caplog.text
    flops = module.training_flops(8)
    assert "FLOPs per training step (forward + backward, batch 8 per device)" in caplog.text and flops > 1e8


def test_a_run_without_a_progress_bar_prints_a_line_every_tenth_with_an_eta(capsys, monkeypatch):
    import igdit.callbacks as callbacks

    clock = iter(float(s) for s in range(0, 1000, 5))
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    progress = callbacks.StepProgress("st seed 1")
    trainer = SimpleNamespace(global_step=0, max_steps=40, is_global_zero=True,
                              callback_metrics={"train/loss": torch.tensor(0.5)})
    progress.on_train_start(trainer, None)
    for step in range(1, 41):
        trainer.global_step = step
        progress.on_train_batch_end(trainer, None, None, None, step)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and lines[0] == "st seed 1: step 4/40 (10%), 5s, ETA 45s, train/loss 0.5000"
    assert lines[-1] == "st seed 1: step 40/40 (100%), 50s, train/loss 0.5000"
