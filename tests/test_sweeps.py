"""Optuna sweeps: the sweep file, sampling and training trials, resuming, grids, failures, MLflow reporting."""
import io
from pathlib import Path

import lightning
import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from igdit.config import ConfigError
from igdit.data import load_meta
from igdit.sweeps import SweepSpec, run_sweep

from helpers import tiny_module

RANDOM = {"class_path": "optuna.samplers.RandomSampler", "init_args": {"seed": 0}}
GRID = {"class_path": "optuna.samplers.GridSampler"}

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:.*covariance is singular")  # tiny K keeps the tests fast


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, digits_root):
    """A tiny trained-looking checkpoint: the default model with perturbed weights and the digits' meta."""
    torch.manual_seed(0)
    module = tiny_module()
    with torch.no_grad():
        for p in module.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__, "igdit_data_meta": load_meta(digits_root)}, path)
    return path


def _base(tmp_path, digits_root, name="base.yaml", **fid):
    """The default experiment pointed at the test shards, with a FIDCallback small enough for a test."""
    cfg = yaml.safe_load((REPO / "experiments/default.yaml").read_text())
    cfg["data"]["root"] = str(digits_root)
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("FIDCallback"):
            cb["init_args"].update({"num_samples": 20, "sampler": "euler", "steps": 1, "batch_size": 20} | fid)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _sweep(tmp_path, digits_root, name="s", **fields):
    spec = {
        "study": {"name": name, "storage": f"sqlite:///{tmp_path / 'optuna.db'}", "direction": "minimize",
                  "sampler": RANDOM, "n_trials": 3},
        "kind": "sampling", "base": str(_base(tmp_path, digits_root)), "objective": {"setting": "ig"},
        "search_space": {"guidance.ig.scale": {"type": "float", "low": 1.0, "high": 3.0}},
        "mlflow": {"experiment": "sweeps", "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    for key, value in fields.items():
        section, _, sub = key.partition("__")
        if sub:
            spec[section][sub] = value
        else:
            spec[section] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _runs(tmp_path, role):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweeps")
    return client, client.search_runs([experiment.experiment_id], filter_string=f"tags.`igdit.role` = '{role}'")


def test_a_sampling_sweep_writes_one_child_run_per_trial_and_the_best_into_the_parent(tmp_path, digits_root,
                                                                                      checkpoint):
    out = io.StringIO()
    summary = run_sweep(SweepSpec.load(str(_sweep(tmp_path, digits_root))), str(checkpoint), out=out)
    client, trials = _runs(tmp_path, "trial")
    _, parents = _runs(tmp_path, "study")
    assert len(trials) == 3 and len(parents) == 1
    parent = parents[0]
    values = {}
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.data.tags["igdit.study"] == "s"
        assert run.data.tags["igdit.state"] == "COMPLETE" and run.info.status == "FINISHED"
        assert 1.0 <= float(run.data.params["guidance.ig.scale"]) <= 3.0
        values[int(run.data.tags["igdit.trial"])] = run.data.metrics["objective"]
        config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text())
        assert config["evaluation"]["num_samples"] == 20  # plain YAML, no python tags (num_samples is a PositiveInt)
    assert sorted(values) == [0, 1, 2] and len(set(values.values())) == 3  # different scales, different FD
    best = min(values, key=values.get)
    assert parent.data.metrics["best_value"] == pytest.approx(values[best])
    assert parent.data.tags["igdit.best_trial"] == str(best) and summary["best"]["number"] == best
    plots = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(parent.info.run_id, "plots/after-3-trials")}
    assert {"history.html", "history.png"} <= plots
    lines = out.getvalue().splitlines()
    assert sum(line.startswith("trial ") for line in lines) == 3 and lines[-1].startswith("best fd_digits/ig")
    # The trial's value is the FIDCallback protocol's Fréchet distance of that setting: rescore one by hand.
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.user_attrs["objective"] == "fd_digits/ig"
    assert all(t.user_attrs["nfe"] == 1 and t.user_attrs["num_samples"] == 20 for t in study.trials)


def test_running_the_same_sweep_again_continues_instead_of_redoing(tmp_path, digits_root, checkpoint):
    path = str(_sweep(tmp_path, digits_root))
    run_sweep(SweepSpec.load(path), str(checkpoint), out=io.StringIO())
    out = io.StringIO()
    run_sweep(SweepSpec.load(path), str(checkpoint), out=out)
    assert "3 trial(s) finished, 0 to run" in out.getvalue()
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 3
    run_sweep(SweepSpec.load(path), str(checkpoint), n_trials=4, out=io.StringIO())
    assert len(optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials) == 4
    _, parents = _runs(tmp_path, "study")
    _, trials = _runs(tmp_path, "trial")
    assert len(parents) == 1 and len(trials) == 4  # one parent per study, across sessions


def test_a_grid_sweep_covers_exactly_its_grid(tmp_path, digits_root, checkpoint):
    space = {"guidance.ig.scale": {"type": "float", "low": 1.0, "high": 2.0, "grid": [1.0, 2.0]},
             "guidance.ig.interval.low": {"type": "float", "low": 0.0, "high": 0.5, "grid": [0.0, 0.5]}}
    path = str(_sweep(tmp_path, digits_root, study__sampler=GRID, study__n_trials=None, search_space=space))
    spec = SweepSpec.load(path)
    assert spec.n_trials == 4
    run_sweep(spec, str(checkpoint), out=io.StringIO())
    run_sweep(SweepSpec.load(path), str(checkpoint), out=io.StringIO())  # nothing left to do
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    combos = sorted((t.params["guidance.ig.scale"], t.params["guidance.ig.interval.low"]) for t in study.trials)
    assert combos == [(1.0, 0.0), (1.0, 0.5), (2.0, 0.0), (2.0, 0.5)]


def test_a_failing_trial_is_recorded_as_failed_and_the_study_goes_on(tmp_path, digits_root, checkpoint,
                                                                       monkeypatch):
    from igdit import sweeps

    space = {"guidance.ig.scale": {"type": "categorical", "choices": [1.5, 2.0], "grid": [1.5, 2.0]}}
    path = _sweep(tmp_path, digits_root, study__sampler=GRID, study__n_trials=None, search_space=space)
    original = sweeps.SamplingTrial.__call__

    def fail_at_1_5(self, trial, values, run_id):
        if values["guidance.ig.scale"] == 1.5:
            raise RuntimeError("out of memory at scale 1.5")
        return original(self, trial, values, run_id)

    monkeypatch.setattr(sweeps.SamplingTrial, "__call__", fail_at_1_5)
    out = io.StringIO()
    run_sweep(SweepSpec.load(str(path)), str(checkpoint), out=out)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = {t.params["guidance.ig.scale"]: t.state.name for t in study.trials}
    assert states == {1.5: "FAIL", 2.0: "COMPLETE"}
    failed = next(t for t in study.trials if t.state.name == "FAIL")
    assert "out of memory at scale 1.5" in failed.user_attrs["error"]
    _, trials = _runs(tmp_path, "trial")
    run = next(r for r in trials if r.data.tags["igdit.state"] == "FAIL")
    assert run.info.status == "FAILED" and "RuntimeError" in run.data.tags["igdit.error"]
    assert "fail" in out.getvalue()


def test_a_constraint_violation_prunes_the_trial_without_sampling(tmp_path, digits_root, checkpoint):
    space = {"guidance.ig.interval.low": {"type": "float", "low": 0.6, "high": 0.6, "grid": [0.6]},
             "guidance.ig.interval.high": {"type": "float", "low": 0.5, "high": 1.0, "grid": [0.5, 1.0]}}
    path = _sweep(tmp_path, digits_root, study__sampler=GRID, study__n_trials=None, search_space=space,
                  constraints=["guidance.ig.interval.low < guidance.ig.interval.high"])
    run_sweep(SweepSpec.load(str(path)), str(checkpoint), out=io.StringIO())
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = {t.params["guidance.ig.interval.high"]: t.state.name for t in study.trials}
    assert states == {0.5: "PRUNED", 1.0: "COMPLETE"}


def test_an_interrupted_sweep_resumes_and_redoes_the_interrupted_trial(tmp_path, digits_root, checkpoint,
                                                                       monkeypatch):
    from igdit import sweeps

    path = str(_sweep(tmp_path, digits_root))
    calls = {"n": 0}
    original = sweeps.SamplingTrial.__call__

    def interrupt_second(self, trial, values, run_id):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, trial, values, run_id)

    monkeypatch.setattr(sweeps.SamplingTrial, "__call__", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(SweepSpec.load(path), str(checkpoint), out=io.StringIO())
    _, parents = _runs(tmp_path, "study")
    assert parents[0].info.status == "KILLED"
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
    monkeypatch.setattr(sweeps.SamplingTrial, "__call__", original)
    out = io.StringIO()
    run_sweep(SweepSpec.load(path), str(checkpoint), out=out)
    assert "1 trial(s) finished, 2 to run" in out.getvalue()
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 3


@pytest.mark.parametrize("change,field", [
    ({"study__name": "bad name!"}, "study.name"),
    ({"kind": "tuning"}, "kind"),
    ({"base": "experiments/nope.yaml"}, "base"),
    ({"study__storage": "optuna.db"}, "study.storage"),
    ({"study__sampler": {"class_path": "optuna.samplers.NoSuchSampler"}}, "study.sampler"),
    ({"study__sampler": {"class_path": "optuna.samplers.TPESampler", "init_args": {"n_startup": 3}}},
     "study.sampler.n_startup"),
    ({"study__pruner": {"class_path": "optuna.pruners.Hyperbandish"}}, "study.pruner"),
    ({"study__n_trials": 0}, "study.n_trials"),
    ({"search_space": {"model.backbone.exits": {"type": "int", "low": 1, "high": 3}}},
     "search_space.model.backbone.exits"),
    ({"search_space": {"guidance.ig.scale": {"type": "float", "low": 3.0, "high": 1.0}}}, "search_space.guidance.ig.scale.high"),
    ({"search_space": {"guidance.ig.scale": {"type": "float", "low": 1, "high": 2, "grid": [5]}}}, "search_space.guidance.ig.scale.grid"),
    ({"search_space": {"guidance.ig.scale": {"type": "gaussian"}}}, "search_space.guidance.ig.scale.type"),
    ({"study__sampler": GRID}, "search_space.guidance.ig.scale.grid"),
    ({"constraints": ["guidance.ig.scale < guidance.cfg.scale"]}, "constraints[0]"),
    ({"evaluation": {"num_samples": 1}}, "evaluation.num_samples"),
    ({"evaluation": {"every_n_steps": 10}}, "evaluation.every_n_steps"),
    ({"train": {"max_steps": 10}}, "train"),
    ({"objective": {"goal": "fd"}}, "objective.goal"),
    ({"objective": {"setting": "ig", "metric": "is"}}, "objective.metric"),  # IS needs Inception features
    ({"sweep_name": "x"}, "sweep_name"),
])
def test_an_invalid_sweep_file_gets_a_one_line_error_naming_the_field(change, field, tmp_path, digits_root, capsys):
    from igdit.cli import main

    path = _sweep(tmp_path, digits_root, **change)
    with pytest.raises(ConfigError) as err:
        SweepSpec.load(str(path))
    assert str(err.value).startswith(field + ":"), str(err.value)
    assert main(["sweep", str(path)]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"error: {field}:") and "\n" not in line


def test_a_training_sweep_over_exit_blocks_the_backbone_lacks_is_refused_when_it_loads(tmp_path, digits_root, capsys):
    """exits 0..6 on a 6-block SiT-T/2 was accepted, and the trials at 0 and 6 failed at run time."""
    from igdit.cli import main

    space = {"model.backbone.exits": {"type": "int", "low": 0, "high": 6, "as_list": True}}
    path = _sweep(tmp_path, digits_root, kind="training", search_space=space, train={"max_steps": 20})
    assert main(["sweep", str(path)]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: search_space.model.backbone.exits: 0 is not allowed; a trial could draw it") \
        and "model.backbone.exits" in line.split("refuses it: ", 1)[1] and "\n" not in line


def test_the_shipped_sweeps_load_and_name_their_base_experiment(monkeypatch):
    monkeypatch.chdir(REPO)  # paths in sweep files are relative to the repository root, where make runs
    # every sweep searches the default experiment unless it studies a method with its own experiment
    bases = {"st_ablation_digits.yaml": "experiments/st_stage2_digits.yaml",
             "ig_accel_omega_digits.yaml": "experiments/ig_accel_digits.yaml"}
    for path in sorted(Path("sweeps").glob("*.yaml")):
        spec = SweepSpec.load(str(path))
        assert spec.base == bases.get(path.name, "experiments/default.yaml") and spec.n_trials >= 8
    grid = SweepSpec.load("sweeps/ig_cfg_guidance.yaml")
    assert grid.is_grid() and grid.n_trials == 24
    layer = SweepSpec.load("sweeps/ig_layer.yaml")
    assert layer.kind == "training" and layer.evaluation_callback().every_n_steps == 200
    accel = SweepSpec.load("sweeps/ig_accel_omega_digits.yaml")
    omegas = accel.search_space["model.terms.ig_accel.omega"].grid
    assert accel.is_grid() and accel.n_trials == len(omegas) == 8 and 0.0 in omegas and max(omegas) < 1


def test_the_st_ablation_searches_table_5s_knobs_over_the_teachers_the_teacher_run_writes(monkeypatch):
    """Every teacher the sweep can draw is a checkpoint experiments/st_stage1_teachers_digits.yaml writes."""
    monkeypatch.chdir(REPO)
    spec = SweepSpec.load("sweeps/st_ablation_digits.yaml")
    knobs = {path.rsplit(".", 1)[-1] for path in spec.search_space}
    assert knobs == {"teacher_block", "student_block", "omega", "weight", "teacher_ckpt"}
    teachers = yaml.safe_load(Path("experiments/st_stage1_teachers_digits.yaml").read_text())
    keeper = next(c["init_args"] for c in teachers["trainer"]["callbacks"] if "dirpath" in c.get("init_args", {}))
    written = {f"{keeper['dirpath']}/{keeper['filename'].replace('{step}', f'step={step}')}.ckpt"
               for step in range(keeper["every_n_train_steps"], teachers["trainer"]["max_steps"] + 1,
                                 keeper["every_n_train_steps"])}
    assert set(spec.search_space["model.terms.self_guided.teacher_ckpt"].choices) == written
    stage1 = yaml.safe_load(Path("experiments/st_stage1_digits.yaml").read_text())
    assert teachers["model"] == stage1["model"]  # the same stage 1, only trained longer


def test_a_sampling_sweep_without_a_checkpoint_says_how_to_get_one(tmp_path, digits_root):
    with pytest.raises(ConfigError, match="^checkpoint: .*make train"):
        run_sweep(SweepSpec.load(str(_sweep(tmp_path, digits_root))), None, out=io.StringIO())


def test_the_suites_lookups_ignore_a_populated_checkout(tmp_path, digits_root, checkpoint, own_working_directory,
                                                        monkeypatch):
    """After `make train` the checkout holds runs/<experiment>/<run>/checkpoints/last.ckpt: a lookup run from the
    checkout finds it, and the same lookup in a test (its own working directory) does not."""
    from igdit.sweeps import latest_checkpoint

    checkout = tmp_path / "checkout"
    found = checkout / "runs" / "igdit-digits" / "run0" / "checkpoints" / "last.ckpt"
    found.parent.mkdir(parents=True)
    found.write_bytes(checkpoint.read_bytes())
    spec = SweepSpec.load(str(_sweep(tmp_path, digits_root)))
    assert Path.cwd() == own_working_directory and not any(own_working_directory.iterdir())
    assert latest_checkpoint(spec) is None
    with pytest.raises(ConfigError, match="^checkpoint: .*make train"):
        run_sweep(spec, None, out=io.StringIO())
    monkeypatch.chdir(checkout)  # what a user's sweep in the checkout sees
    assert Path(latest_checkpoint(spec)).resolve() == found.resolve()


@pytest.mark.slow
def test_a_training_sweep_trains_reports_fid_per_evaluation_and_logs_into_the_trial_run(tmp_path, digits_root):
    space = {"model.backbone.exits": {"type": "int", "low": 1, "high": 2, "as_list": True, "grid": [1, 2]}}
    path = _sweep(tmp_path, digits_root, kind="training", study__sampler=GRID, study__n_trials=None,
                  search_space=space, train={"max_steps": 20, "overrides": [
                      "--trainer.val_check_interval", "10", "--trainer.default_root_dir", str(tmp_path / "runs"),
                      "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "5"]},
                  evaluation={"every_n_steps": 10, "num_samples": 20, "steps": 1})
    run_sweep(SweepSpec.load(str(path)), out=io.StringIO())
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert sorted(t.params["model.backbone.exits"] for t in study.trials) == [1, 2]
    client, trials = _runs(tmp_path, "trial")
    for trial in study.trials:
        assert trial.state.name == "COMPLETE"
        assert sorted(trial.intermediate_values) == [10, 20]  # reported at each FID evaluation, by global step
        assert trial.value == trial.intermediate_values[20]
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        # the trial trained what it says
        assert run.data.params["backbone/init_args/exits"] == f"[{trial.params['model.backbone.exits']}]"
        assert "train/loss" in run.data.metrics and "fd_digits/ig" in run.data.metrics
        history = client.get_metric_history(run.info.run_id, "fd_digits/ig")
        assert [m.value for m in history][-1] == pytest.approx(trial.value)


def test_autoguidance_is_searchable_in_a_sampling_sweep(tmp_path, digits_root, checkpoint):
    """The base FIDCallback's setting guides with a weaker checkpoint; the sweep searches its scale."""
    guide = torch.load(checkpoint, weights_only=True)
    torch.manual_seed(5)
    guide["state_dict"] = {k: v + 0.05 * torch.randn_like(v) for k, v in guide["state_dict"].items()}
    torch.save(guide, tmp_path / "guide.ckpt")
    base = _base(tmp_path, digits_root, "ag_base.yaml",
                 settings={"ag": {"ag": {"scale": 2.0, "ckpt": str(tmp_path / "guide.ckpt")}}, "none": {}})
    path = _sweep(tmp_path, digits_root, objective={"setting": "ag"}, study__sampler=GRID, study__n_trials=None,
                  search_space={"guidance.ag.scale": {"type": "float", "low": 1.0, "high": 3.0, "grid": [1.0, 3.0]}})
    raw = yaml.safe_load(path.read_text())
    raw["base"] = str(base)
    path.write_text(yaml.safe_dump(raw))
    run_sweep(SweepSpec.load(str(path)), str(checkpoint), out=io.StringIO())
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    values = {t.params["guidance.ag.scale"]: t.value for t in study.trials}
    assert set(values) == {1.0, 3.0} and all(t.state.name == "COMPLETE" for t in study.trials)
    assert values[1.0] != pytest.approx(values[3.0], rel=1e-3)  # the guide network changed the samples
    assert all(t.user_attrs["nfe"] == 1 for t in study.trials)  # NFE counts the sampler's steps, not networks


def test_a_continued_seeded_study_does_not_replay_its_parameters(tmp_path, digits_root, checkpoint):
    path = str(_sweep(tmp_path, digits_root))
    run_sweep(SweepSpec.load(path), str(checkpoint), out=io.StringIO())
    run_sweep(SweepSpec.load(path), str(checkpoint), n_trials=6, out=io.StringIO())
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    scales = [t.params["guidance.ig.scale"] for t in study.trials]
    assert len(scales) == 6 and len(set(scales)) == 6  # a restarted seeded sampler would repeat 0-2 as 3-5


def test_a_training_sweep_on_several_devices_is_refused_when_it_loads(tmp_path, digits_root):
    space = {"model.terms.ig_exit.weight": {"type": "float", "low": 0.1, "high": 1.0}}
    path = _sweep(tmp_path, digits_root, kind="training", search_space=space, objective={"setting": "ig"},
                  train={"max_steps": 10, "overrides": ["--trainer.devices", "2", "--trainer.accelerator", "cpu"]})
    with pytest.raises(ConfigError, match=r"^base trainer.devices: .*one device"):
        SweepSpec.load(str(path))


@pytest.mark.slow
def test_a_killed_sweep_worker_leaves_no_running_trial_and_its_trial_is_retried(tmp_path, digits_root, checkpoint):
    import signal
    import subprocess
    import sys
    import time

    path = _sweep(tmp_path, digits_root, study__n_trials=4, study__heartbeat_interval=1, study__grace_period=2)
    base = _base(tmp_path, digits_root, name="slow_base.yaml", num_samples=500, steps=20)  # trials long enough to kill
    raw = yaml.safe_load(path.read_text())
    raw["base"] = str(base)
    path.write_text(yaml.safe_dump(raw))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    command = [sys.executable, "-m", "igdit.cli", "sweep", str(path), "--ckpt", str(checkpoint)]
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.time() + 240

    def trials():
        try:
            return optuna.load_study(study_name="s", storage=storage).trials
        except KeyError:  # the study is not created yet
            return []

    def states():
        return [t.state.name for t in trials()]

    def training_after_a_complete_trial():
        now = trials()
        return (sum(t.state.name == "COMPLETE" for t in now) >= 1 and now[-1].state.name == "RUNNING"
                and "mlflow_run_id" in now[-1].user_attrs)  # a kill before the run id: the next test

    while not training_after_a_complete_trial() and time.time() < deadline:
        time.sleep(0.2)
    worker.send_signal(signal.SIGKILL)  # a preempted worker: no chance to clean up
    worker.wait()
    killed = len(states()) - 1
    assert states()[killed] == "RUNNING"
    time.sleep(3)  # past the grace period: the dead worker's heartbeat is stale
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    study = optuna.load_study(study_name="s", storage=storage)
    assert "RUNNING" not in [t.state.name for t in study.trials]
    stale = study.trials[killed]
    assert stale.state.name == "FAIL"
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == stale.number]
    assert len(retried) == 1 and retried[0].params == stale.params and retried[0].state.name == "COMPLETE"
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len({tuple(sorted(t.params.items())) for t in complete}) == len(complete)  # nothing replayed
    client, trials = _runs(tmp_path, "trial")
    _, parents = _runs(tmp_path, "study")
    assert len(parents) == 1  # the parent run is reused
    stale_run = client.get_run(stale.user_attrs["mlflow_run_id"])
    assert stale_run.info.status == "KILLED" and stale_run.data.tags["igdit.state"] == "FAIL"
    assert all(r.info.status != "RUNNING" for r in trials)


def test_a_stale_trial_killed_before_it_recorded_its_run_id_still_gets_its_run_closed(tmp_path, digits_root):
    from igdit.sweeps.report import SweepTracker

    tracker = SweepTracker(SweepSpec.load(_sweep(tmp_path, digits_root)))
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s")
    trial = study.ask()
    other = tracker.start_trial(study.ask())
    orphan = tracker.start_trial(trial)  # the worker dies here, before trial.set_user_attr("mlflow_run_id", ...)
    tracker.close_stale(study.trials[trial.number])

    client, _ = _runs(tmp_path, "trial")
    run = client.get_run(orphan)
    assert run.info.status == "KILLED" and run.data.tags["igdit.state"] == "FAIL"
    assert client.get_run(other).info.status == "RUNNING"  # another trial's run is left alone
