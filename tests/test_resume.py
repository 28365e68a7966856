"""Long runs survive: a fit killed with SIGKILL and resumed with --ckpt_path last continues the same run (folder,
MLflow run, step, optimiser, schedule, EMA, FID schedule, data position, random state) and ends where an
uninterrupted run of the same seed ends."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from helpers import REPO, short_config


def _fit_command(config: Path, root: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "igdit.cli", "fit", "--config", str(config), "--data.root", str(data),
            "--trainer.default_root_dir", str(root / "runs"),
            "--trainer.logger.init_args.tracking_uri", f"sqlite:///{root / 'mlflow.db'}", *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_a_killed_run_resumed_from_last_ends_as_an_uninterrupted_one(tmp_path, digits_root):
    config = short_config(tmp_path / "short.yaml", max_steps=60, every=20, samples_per_class=1, grid_steps=2,
                          log_every_n_steps=5)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    done = subprocess.run(_fit_command(config, whole, digits_root), env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    process = subprocess.Popen(_fit_command(config, broken, digits_root), env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((broken / "runs").rglob("last.ckpt")) and time.time() < deadline:
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)  # after the step-20 checkpoint, somewhere in steps 20..60
    process.wait()
    killed_at = torch.load(next((broken / "runs").rglob("last.ckpt")), weights_only=True)["global_step"]
    assert 20 <= killed_at < 60

    resumed = subprocess.run(_fit_command(config, broken, digits_root, "--ckpt_path", "last"), env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    (a,), (b,) = list((whole / "runs").rglob("last.ckpt")), list((broken / "runs").rglob("last.ckpt"))
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert a["global_step"] == b["global_step"] == 60  # the final step is saved as last
    for key in ("state_dict", "current_model_state"):  # EMA and raw weights
        worst = max((a[key][k] - b[key][k]).abs().max().item() for k in a[key])
        print(f"killed at step {killed_at} and resumed vs uninterrupted, max abs difference of {key}: {worst:.2e}")
        assert worst < 1e-5, (key, worst)
    assert any(not torch.equal(a["state_dict"][k], a["current_model_state"][k]) for k in a["state_dict"])

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


def test_last_resolves_to_the_newest_checkpoint_of_the_experiment_and_reopens_its_run(tmp_path, digits_root):
    """--ckpt_path last picks, among this experiment's runs and the checkpoints Lightning saved on SLURM's
    pre-emption signal, the newest one, and the logger reopens the run it belongs to."""
    from jsonargparse import Namespace

    from igdit.experiment import resolve_resume

    def checkpoint(path: Path, run_id: str, experiment: str = "exp") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": {}, "hyper_parameters": {}, "igdit_run": {"run_id": run_id, "experiment": experiment}},
                   path)
        time.sleep(0.02)  # distinct modification times
        return path

    def config(**init_args):
        logger = Namespace(class_path="igdit.tracking.MLflowLogger",
                           init_args=Namespace(experiment_name="exp", run_id=None, **init_args))
        return Namespace(ckpt_path="last", trainer=Namespace(default_root_dir=str(tmp_path), logger=logger))

    empty = config()
    assert resolve_resume(empty) is None  # nothing yet: a new run
    older = checkpoint(tmp_path / "exp" / "run1" / "checkpoints" / "last.ckpt", "run1")
    checkpoint(tmp_path / "hpc_ckpt_1.ckpt", "runX", experiment="other")  # another experiment's pre-emption save
    newer = checkpoint(tmp_path / "exp" / "run2" / "checkpoints" / "last.ckpt", "run2")
    found = config()
    assert resolve_resume(found) == str(newer) and found.trainer.logger.init_args.run_id == "run2"
    named = config()
    named.trainer.logger.init_args.run_id = "run1"
    assert resolve_resume(named) == str(older)
    hpc = checkpoint(tmp_path / "hpc_ckpt_2.ckpt", "run1")
    assert resolve_resume(config()) == str(hpc)
