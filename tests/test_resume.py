"""Long runs survive: a fit killed with SIGKILL and resumed with --ckpt_path last continues the same run (folder,
MLflow run, step, optimiser, schedule, EMA, FID schedule, data position, random state) and ends where an
uninterrupted run of the same seed ends."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from helpers import REPO, short_config
from igdit.config import ConfigError


def _fit_command(config: Path, root: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "igdit.cli", "fit", "--config", str(config), "--data.root", str(data),
            "--trainer.default_root_dir", str(root / "runs"),
            "--trainer.logger.init_args.tracking_uri", f"sqlite:///{root / 'mlflow.db'}", *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits_root):
    """One uninterrupted run of the shortened default experiment (60 steps; checkpoints and FID every 20), which the
    interrupted runs of this file must end exactly like. Returns (its folder, the experiment file)."""
    root = tmp_path_factory.mktemp("whole")
    config = short_config(root / "short.yaml", max_steps=60, every=20, samples_per_class=1, grid_steps=2,
                          log_every_n_steps=5)
    done = subprocess.run(_fit_command(config, root, digits_root), env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, config


def _same_end(whole: Path, broken: Path) -> None:
    """Both runs ended at step 60 with the same EMA and raw weights (float tolerance)."""
    (a,), (b,) = list((whole / "runs").rglob("last.ckpt")), list((broken / "runs").rglob("last.ckpt"))
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert a["global_step"] == b["global_step"] == 60  # the final step is saved as last
    for key in ("state_dict", "current_model_state"):  # EMA and raw weights
        worst = max((a[key][k] - b[key][k]).abs().max().item() for k in a[key])
        print(f"interrupted and resumed vs uninterrupted, max abs difference of {key}: {worst:.2e}")
        assert worst < 1e-5, (key, worst)
    assert any(not torch.equal(a["state_dict"][k], a["current_model_state"][k]) for k in a["state_dict"])


def _wait_for_last(folder: Path, process, step: int = 20) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        found = list((folder / "runs").rglob("last.ckpt"))
        if found and torch.load(found[0], weights_only=True, mmap=True)["global_step"] >= step:
            return
        time.sleep(0.2)
    raise AssertionError("no last.ckpt appeared")


@pytest.mark.slow
def test_a_killed_run_resumed_from_last_ends_as_an_uninterrupted_one(uninterrupted, tmp_path, digits_root):
    whole, config = uninterrupted
    broken = tmp_path / "broken"
    process = subprocess.Popen(_fit_command(config, broken, digits_root), env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    _wait_for_last(broken, process)
    os.kill(process.pid, signal.SIGKILL)  # after the step-20 checkpoint, somewhere in steps 20..60
    process.wait()
    killed_at = torch.load(next((broken / "runs").rglob("last.ckpt")), weights_only=True)["global_step"]
    assert 20 <= killed_at < 60

    resumed = subprocess.run(_fit_command(config, broken, digits_root, "--ckpt_path", "last"), env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_end(whole, broken)

    client = MlflowClient(f"sqlite:///{broken / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("igdit-digits").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same MLflow run, finished
    run_dirs = list((broken / "runs" / "igdit-digits").iterdir())
    assert [d.name for d in run_dirs] == [runs[0].info.run_id]  # the same run folder
    steps = sorted({m.step for m in client.get_metric_history(runs[0].info.run_id, "train/diffusion")})
    assert steps[-1] == 59 and steps == sorted(set(steps))
    fd = client.get_metric_history(runs[0].info.run_id, "fd_digits/ig")
    assert sorted({m.step for m in fd}) == [19, 39, 59]  # every evaluation, the checkpoint's step included
    whole_client = MlflowClient(f"sqlite:///{whole / 'mlflow.db'}")
    whole_run = whole_client.search_runs([whole_client.get_experiment_by_name("igdit-digits").experiment_id])[0]
    expected = {m.step: m.value for m in whole_client.get_metric_history(whole_run.info.run_id, "fd_digits/ig")}
    assert {m.step: m.value for m in fd if m.step == 59} == pytest.approx({59: expected[59]}, rel=1e-4)


@pytest.mark.slow
def test_sigterm_saves_its_step_marks_the_run_killed_and_explicit_last_and_longer_resumes_finish_it(
        uninterrupted, tmp_path, digits_root, capsys):
    """What a scheduler sends first: SIGTERM. Before, the run exited 0 with no message and no checkpoint."""
    from igdit.cli import main

    whole, config = uninterrupted
    broken = tmp_path / "broken"
    process = subprocess.Popen(_fit_command(config, broken, digits_root), env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    # The periodic checkpoint keeps only its newest file, so on a fast machine step 20's is gone by the time the run
    # stops: keep a copy as soon as it is there (checkpoints are written atomically, so a file that is there is whole).
    deadline, periodic = time.time() + 300, []
    while not periodic and time.time() < deadline and process.poll() is None:
        periodic = list((broken / "runs").rglob("epoch=*-step=20.ckpt"))
        time.sleep(0.05)
    assert len(periodic) == 1, "no periodic step-20 checkpoint appeared"
    periodic = Path(shutil.copy(periodic[0], tmp_path / periodic[0].name))
    _wait_for_last(broken, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    line = err.strip().splitlines()[-1]
    assert process.returncode == 143, err[-3000:]
    stopped = int(line.split("at step ")[1].split()[0])
    assert line.startswith("error: stopped by SIGTERM at step ") and "--ckpt_path last" in line and 20 <= stopped < 60
    (run_dir,) = (broken / "runs" / "igdit-digits").iterdir()
    folder = run_dir / "checkpoints"
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == stopped  # the step it stopped at
    assert f"{folder / 'last.ckpt'} holds step {stopped}" in line
    client = MlflowClient(f"sqlite:///{broken / 'mlflow.db'}")
    assert client.get_run(run_dir.name).info.status == "KILLED"

    # By explicit path, from (a copy of) the periodic step-20 checkpoint (saved before last.ckpt existed, so Lightning's callback
    # state in it does not know last.ckpt): the run keeps writing last.ckpt, not last-v1.ckpt, and ends as the
    # uninterrupted one.
    fit = _fit_command(config, broken, digits_root)[3:]
    assert main([*fit, "--ckpt_path", str(periodic)]) == 0
    assert not list(folder.glob("last-v*.ckpt"))
    _same_end(whole, broken)
    assert client.get_run(run_dir.name).info.status == "FINISHED"

    capsys.readouterr()
    assert main([*fit, "--ckpt_path", "last"]) == 0  # finished: nothing is trained again, nothing crashes
    assert capsys.readouterr().out.strip().startswith(f"nothing to train: run {run_dir.name} is at step 60")

    grid = (run_dir / "samples.png").stat().st_mtime_ns
    assert main([*fit, "--ckpt_path", "last", "--trainer.max_steps", "70"]) == 0  # extending a finished run
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 70
    assert (run_dir / "samples.png").stat().st_mtime_ns > grid  # its end-of-run grid shows the new end
    assert [r.info.status for r in client.search_runs([client.get_experiment_by_name("igdit-digits").experiment_id])] \
        == ["FINISHED"]


def test_sigint_stops_between_steps_as_sigterm_does_and_a_second_one_at_once():
    """SIGINT is routed to Lightning's SIGTERM handler while the training loop runs (no KeyboardInterrupt in the middle
    of an optimiser step); outside the loop, or the second time, it interrupts at once. A SIGINT the launching shell
    set to be ignored (a background job's) stays ignored."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from igdit.callbacks import StopOnSignal

    stop, lightning_calls = StopOnSignal(), []
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when pytest runs as a background job
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with stop.listening():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with stop.listening():
            ours = signal.getsignal(signal.SIGTERM)

            def lightning(number, frame):  # Lightning's handler: sets received_sigterm, then calls the one it replaced
                lightning_calls.append(number)
                ours(number, frame)

            signal.signal(signal.SIGTERM, lightning)
            stop.on_train_start(None, None)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            assert stop.received == "SIGINT" and lightning_calls == [signal.SIGINT]
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
            stop.on_train_end(None, None)
            with pytest.raises(SIGTERMException):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


IG = {"backbone": {"class_path": "igdit.models.SiT", "init_args": {"size": "T/2", "exits": [2]}}}
ACCEL = {"backbone": {"class_path": "igdit.models.SiT", "init_args": {"size": "T/2", "exits": [2]}},
         "terms": {"ig_accel": {"class_path": "igdit.objectives.IGAccelerationLoss"}}}
DATA = {"root": "data/digits", "batch_size": 128}


def _checkpoint(path: Path, run_id: str, model: dict = IG, data: dict = DATA, step: int = 20,
                experiment: str = "exp") -> Path:
    """A file with what resume resolution reads of a Lightning checkpoint (its tensors are not needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "hyper_parameters": {**model, "_instantiator": "lightning.pytorch.cli"},
                "datamodule_hyper_parameters": dict(data), "global_step": step, "loops": {}, "optimizer_states": [],
                "igdit_run": {"run_id": run_id, "experiment": experiment}}, path)
    time.sleep(0.02)  # distinct modification times
    return path


def _config(tmp_path: Path, ckpt_path="last", max_steps: int = 60, **init_args):
    from jsonargparse import Namespace

    logger = Namespace(class_path="igdit.tracking.MLflowLogger",
                       init_args=Namespace(**{"experiment_name": "exp", "run_id": None, **init_args}))
    return Namespace(ckpt_path=ckpt_path, trainer=Namespace(default_root_dir=str(tmp_path), logger=logger,
                                                            max_steps=max_steps))


def _resolve(config, model: dict = IG, data: dict = DATA):
    from igdit.resume import resolve_resume

    return resolve_resume(config, {"model": model, "data": data})


def test_last_resolves_to_the_newest_resume_point_of_the_same_config_and_reopens_its_run(tmp_path, capsys):
    """--ckpt_path last picks, among this experiment's runs *of the same config* and the checkpoints Lightning saved on
    SLURM's pre-emption signal, the newest one (a periodic checkpoint counts), and the logger reopens its run."""
    assert _resolve(_config(tmp_path)) is None  # nothing yet: a new run
    assert "starting a new run" in capsys.readouterr().out
    older = _checkpoint(tmp_path / "exp" / "run1" / "checkpoints" / "last.ckpt", "run1")
    _checkpoint(tmp_path / "hpc_ckpt_1.ckpt", "runX", experiment="other")  # another experiment's pre-emption save
    _checkpoint(tmp_path / "exp" / "run2" / "checkpoints" / "last.ckpt", "run2", step=20)
    periodic = _checkpoint(tmp_path / "exp" / "run2" / "checkpoints" / "epoch=1-step=40.ckpt", "run2", step=40)
    config = _config(tmp_path)
    assert _resolve(config) == str(periodic) and config.trainer.logger.init_args.run_id == "run2"
    assert _resolve(_config(tmp_path, run_id="run1")) == str(older)
    hpc = _checkpoint(tmp_path / "hpc_ckpt_2.ckpt", "run1", step=50)
    assert _resolve(_config(tmp_path)) == str(hpc)
    same_step = _checkpoint(tmp_path / "exp" / "run2" / "checkpoints" / "last.ckpt", "run2", step=55)
    _checkpoint(tmp_path / "exp" / "run2" / "checkpoints" / "epoch=2-step=55.ckpt", "run2", step=55)
    assert _resolve(_config(tmp_path)) == str(same_step)  # one step saved twice: last.ckpt is the one named


def test_two_configs_under_one_experiment_name_never_continue_each_other(tmp_path, capsys):
    """Every digits YAML logs to igdit-digits: `make train` after an IG-acceleration run continued that run with the
    default objective. The newest run of *this* config is continued, or a new one starts and says why."""
    ig = _checkpoint(tmp_path / "exp" / "ig" / "checkpoints" / "last.ckpt", "ig")
    _checkpoint(tmp_path / "exp" / "accel" / "checkpoints" / "last.ckpt", "accel", model=ACCEL)
    config = _config(tmp_path)
    assert _resolve(config) == str(ig) and config.trainer.logger.init_args.run_id == "ig"
    assert _resolve(_config(tmp_path), model=ACCEL).endswith("accel/checkpoints/last.ckpt")
    config = _config(tmp_path)
    assert _resolve(config, data={**DATA, "root": "elsewhere"}) is None and config.trainer.logger.init_args.run_id is None
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert "starting a new run" in out and "data.root" in out and "2 run(s) there have another config" in out


def test_a_changed_architecture_or_data_root_is_refused_in_one_line_naming_the_fields(tmp_path):
    path = _checkpoint(tmp_path / "exp" / "run1" / "checkpoints" / "last.ckpt", "run1")
    changed = {"backbone": {"class_path": "igdit.models.SiT", "init_args": {"size": "T/2", "exits": [4]}}}
    with pytest.raises(ConfigError, match=r"^ckpt_path: .*model.backbone.init_args.exits: \[4\] \(the run's: \[2\]\)"):
        _resolve(_config(tmp_path, ckpt_path=str(path)), model=changed)
    with pytest.raises(ConfigError, match=r"^trainer.logger.init_args.run_id: 'run1' .*data.root: \"moved\""):
        _resolve(_config(tmp_path, run_id="run1"), data={**DATA, "root": "moved"})


def test_last_passes_over_a_damaged_checkpoint_to_the_newest_readable_one_and_says_which(tmp_path, capsys):
    good = _checkpoint(tmp_path / "exp" / "run1" / "checkpoints" / "epoch=0-step=20.ckpt", "run1", step=20)
    last = _checkpoint(tmp_path / "exp" / "run1" / "checkpoints" / "last.ckpt", "run1", step=40)
    last.write_bytes(last.read_bytes()[:300])  # what a non-atomic write cut by a full disk left
    assert _resolve(_config(tmp_path)) == str(good)
    out = capsys.readouterr().out
    assert f"passing over the unreadable {last}" in out and f"resuming from {good} (step 20)" in out


def test_a_run_id_without_checkpoints_is_refused_instead_of_reopening_the_run(tmp_path):
    """Its folder deleted, `--trainer.logger.init_args.run_id <id> --ckpt_path last` said "starting a new run" and
    reopened the old FINISHED run."""
    with pytest.raises(ConfigError, match=r"^trainer.logger.init_args.run_id: 'gone' .*no readable checkpoint"):
        _resolve(_config(tmp_path, run_id="gone"))


def test_a_finished_run_is_extended_by_more_steps_and_otherwise_left_alone(tmp_path):
    from igdit.config import NothingToTrain

    last = _checkpoint(tmp_path / "exp" / "run1" / "checkpoints" / "last.ckpt", "run1", step=60)
    with pytest.raises(NothingToTrain, match=r"^nothing to train: run run1 is at step 60 .*above 60 to extend it"):
        _resolve(_config(tmp_path, max_steps=60))
    assert _resolve(_config(tmp_path, max_steps=80)) == str(last)
    weights = tmp_path / "imported.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": dict(IG), "global_step": 4000}, weights)
    with pytest.raises(ConfigError, match=r"^ckpt_path: .*holds weights only"):
        _resolve(_config(tmp_path, ckpt_path=str(weights), max_steps=80))
