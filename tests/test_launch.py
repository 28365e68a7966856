"""Launching on several GPUs and nodes: make -> torchrun, SLURM scripts -> srun, and the checks before compute."""
import os
import re
import subprocess
from pathlib import Path

import pytest

from igdit.cli import main
from igdit.config import ConfigError
from igdit.distributed import check_launch, launcher_layout

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}


def _make_n(*args: str) -> list[str]:
    """The commands `make -n` would run (nothing runs), from the repository root, as from a fresh shell: a
    `make test ARGS=...` that runs this test hands its variables to every make below it (through MAKEFLAGS and the
    environment), so those and the Makefile's own knobs (``NAME ?= ...``) are dropped."""
    knobs = set(re.findall(r"^(\w+)\s*\?=", (REPO / "Makefile").read_text(), re.M))
    env = {k: v for k, v in os.environ.items()
           if k not in knobs | {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"}}
    proc = subprocess.run(["make", "-n", "-C", str(REPO), *args], capture_output=True, text=True, check=True, env=env)
    return [line.strip() for line in proc.stdout.splitlines() if line.strip() and not line.startswith("make")]


def test_make_train_on_several_nodes_runs_torchrun_with_matching_trainer_fields():
    commands = _make_n("train", "CONFIG=experiments/sit_xl2_ig.yaml", "NODES=4", "GPUS=8", "NODE_RANK=3",
                       "MASTER_ADDR=node017", "MASTER_PORT=29611", "ARGS=--data.root /datasets/in256")
    assert commands[-1].split() == [
        ".venv/bin/python", "-m", "torch.distributed.run", "--nnodes", "4", "--nproc_per_node", "8",
        "--node_rank", "3", "--master_addr", "node017", "--master_port", "29611", "-m", "igdit.cli",
        "fit", "--config", "experiments/sit_xl2_ig.yaml",
        "--trainer.num_nodes", "4", "--trainer.devices", "8", "--trainer.strategy", "ddp",
        "--data.root", "/datasets/in256"]
    assert not any("data build" in c for c in commands)  # paper configs never build the digits shards


def test_plain_make_train_stays_one_process_with_the_digits():
    commands = _make_n("train", "DATA=/nonexistent/digits")
    assert commands[-2:] == [".venv/bin/igdit data build digits /nonexistent/digits",
                             ".venv/bin/igdit fit --config experiments/default.yaml"]


def test_make_data_splits_an_encoding_across_gpus():
    commands = _make_n("data", "SOURCE=imagefolder:/in/train", "DATA=/nonexistent/in256", "GPUS=8",
                       "DATA_ARGS=--encoder sd-vae-ft-ema --resolution 256")
    assert commands[-1] == (".venv/bin/python -m torch.distributed.run --nnodes 1 --nproc_per_node 8 --node_rank 0 "
                            "--master_addr 127.0.0.1 --master_port 29500 -m igdit.cli data build imagefolder:/in/train "
                            "/nonexistent/in256 --encoder sd-vae-ft-ema --resolution 256")


def _fake_slurm(tmp_path, script: str, args: list[str], env: dict) -> str:
    """Run a shipped sbatch script with stand-ins for srun and scontrol that print what they were given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\necho "srun $*"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho gpu-node-07; echo gpu-node-08\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(REPO), **env}
    proc = subprocess.run(["bash", str(REPO / "experiments/slurm" / script), *args], env=full_env,
                          capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def test_slurm_training_script_runs_one_task_per_gpu_with_nodes_and_devices_from_slurm(tmp_path):
    text = (REPO / "experiments/slurm/train.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --gpus-per-node=8" in text
    line = _fake_slurm(tmp_path, "train.sbatch", ["experiments/sit_b2_ig.yaml", "--data.root", "/d"],
                       {"SLURM_NNODES": "3", "SLURM_NTASKS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "10"})
    assert line == ("srun --kill-on-bad-exit=1 .venv/bin/igdit fit --config experiments/sit_b2_ig.yaml "
                    "--trainer.num_nodes 3 --trainer.devices 8 --trainer.strategy ddp --ckpt_path last --data.root /d")
    # pre-emption: SLURM signals the job before its end, Lightning saves and requeues, the script resumes
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=SIGUSR1@" in text


def test_slurm_data_script_starts_one_torchrun_per_node(tmp_path):
    line = _fake_slurm(tmp_path, "build_data.sbatch", ["/in/train", "data/in256", "--encoder", "sd-vae-ft-ema"],
                       {"SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "64",
                        "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_JOB_ID": "4242"})
    assert line == ("srun --kill-on-bad-exit=1 .venv/bin/python -m torch.distributed.run --nnodes 2 --nproc_per_node 8 "
                    "--rdzv_backend c10d --rdzv_endpoint gpu-node-07:29500 --rdzv_id 4242 -m igdit.cli data build "
                    "imagefolder:/in/train data/in256 --workers 8 --encoder sd-vae-ft-ema")


# ---- the launcher's world against the trainer's fields ----------------------------------------------------
def test_launch_layout_is_read_from_torchrun_and_srun_and_checked_against_the_trainer():
    torchrun = {**TORCHRUN, "WORLD_SIZE": "32", "LOCAL_WORLD_SIZE": "8"}
    assert launcher_layout(torchrun)["nodes"] == 4 and launcher_layout({}) is None
    check_launch(8, 4, torchrun)
    check_launch("auto", 4, torchrun)  # Lightning decides; nothing to compare
    with pytest.raises(ConfigError, match=r"^trainer.devices: 4 .*torchrun started 8 process\(es\) per node "
                                          r"\(--nproc_per_node \(GPUS=\)\) and WORLD_SIZE 32; set trainer.devices to 8"):
        check_launch(4, 4, torchrun)
    with pytest.raises(ConfigError, match=r"^trainer.num_nodes: 2 .*torchrun started 4 node\(s\).*set trainer.num_nodes to 4"):
        check_launch([0, 1, 2, 3, 4, 5, 6, 7], 2, torchrun)
    slurm = {"SLURM_NTASKS": "16", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_NAME": "igdit"}
    check_launch(8, 2, slurm)
    with pytest.raises(ConfigError, match=r"^trainer.devices: 4 .*srun started 8 .*--ntasks-per-node"):
        check_launch(4, 2, slurm)
    with pytest.raises(ConfigError, match=r"^trainer.num_nodes: 1 .*srun started 2 node\(s\) \(--nodes"):
        check_launch(8, 1, slurm)
    check_launch(4, 1, {**slurm, "SLURM_JOB_NAME": "interactive"})  # Lightning's rule: not an srun launch


def _fit(root: Path, scratch: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / "experiments/default.yaml"), "--data.root", str(root),
            "--trainer.logger.init_args.tracking_uri", f"sqlite:///{scratch / 'mlflow.db'}",
            "--trainer.default_root_dir", str(scratch / "runs"), *extra]


@pytest.mark.parametrize("env,extra,error", [
    ({**TORCHRUN, "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, ["--trainer.devices", "8", "--trainer.num_nodes", "4"],
     "error: trainer.num_nodes: 4 is not allowed; torchrun started 2 node(s)"),
    ({**TORCHRUN, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, [],  # default.yaml: devices 1
     "error: trainer.devices: 1 is not allowed; torchrun started 2 process(es) per node"),
    ({}, ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--data.batch_size", "129"],
     "error: data.batch_size: 129 is not allowed; must be divisible by the world size 2"),
    ({}, ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--data.num_workers", "9"],
     "error: data.root: "),
])
def test_a_world_that_does_not_fit_stops_before_compute_with_one_line(env, extra, error, digits_root, tmp_path,
                                                                      capsys, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(_fit(digits_root, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(error), err
    if "num_workers" in extra:
        assert "holds 17 train shard(s); 2 rank(s) x 9 worker(s) each read their own shards and need at least 18" in err
    assert not (tmp_path / "runs").exists()  # no run folder, no checkpoint, no process started
