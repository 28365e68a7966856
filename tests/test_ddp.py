"""Two processes, one model: the default experiment under torchrun + Lightning DDP on CPU (gloo)."""
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import webdataset as wds

from ddp_probe import sample_digest, state_digest
from helpers import free_port, short_config

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, probe_dir: Path) -> Path:
    """The default experiment, 8 steps: validation and checkpoints at step 4 and 8, EMA from the start."""
    probe = {"class_path": "ddp_probe.RankProbe", "init_args": {"out": str(probe_dir)}}
    return short_config(tmp_path / "ddp.yaml", max_steps=8, every=4, samples_per_class=1, grid_steps=4,
                        extra_callbacks=[probe], limit_val_batches=2, log_every_n_steps=2)


@pytest.mark.slow
def test_two_process_ddp_run_finishes_with_identical_ema_weights_and_disjoint_samples(digits_root, tmp_path):
    probe = tmp_path / "probe"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "igdit.cli", "fit", "--config", str(_config(tmp_path, probe)), "--data.root", str(digits_root),
           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.num_nodes", "1",
           "--trainer.strategy", "ddp",
           "--trainer.logger.init_args.tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--trainer.logger.init_args.artifact_location", (tmp_path / "mlartifacts").as_uri(),
           "--trainer.default_root_dir", str(tmp_path / "runs")]
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=480, env=env, cwd=tmp_path)
    wall = time.perf_counter() - start
    print(f"two-process DDP run: {wall:.1f} s wall")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("== igdit run finished ==") == 1  # rank 0 reports

    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [8, 8]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # the EMA weights are the same on both ranks
    checkpoint = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), map_location="cpu", weights_only=True)
    assert state_digest(checkpoint["state_dict"]) == ranks[0]["weights"]  # and they are what was saved

    # Which shard each sample came from, by its stored bytes: rank r must read only shards r, r+2, ...
    urls = sorted(digits_root.glob("train-*.tar"))
    shard_of = defaultdict(set)
    for index, url in enumerate(urls):
        for s in wds.DataPipeline(wds.SimpleShardList([str(url)]), wds.tarfile_to_samples(), wds.decode()):
            shard_of[sample_digest(s["latent.npy"], s["cls"])].add(index)
    for rank, report in enumerate(ranks):
        assert len(report["seen"]) == 8 * 64  # global batch 128 = 64 per rank
        assert len(set(report["seen"])) == len(report["seen"])  # 8 of an epoch's 12 steps: nothing read twice
        assert all(shard_of[d] and all(i % 2 == rank for i in shard_of[d]) for d in report["seen"])
    assert not set(ranks[0]["seen"]) & set(ranks[1]["seen"])  # the two ranks read disjoint samples


@pytest.mark.slow
def test_two_devices_on_cpu_without_torchrun_train_with_lightnings_own_launcher(digits_root, tmp_path):
    """`igdit fit --trainer.devices 2` on a CPU machine: Lightning starts the second process itself (DDP over gloo).
    It failed after 242 lines ("cannot pickle '_thread.lock' object") when the EMA copy of the module was made."""
    config = short_config(tmp_path / "c.yaml", max_steps=4, every=4, samples_per_class=1, grid_steps=2,
                          limit_val_batches=1)
    cmd = [sys.executable, "-m", "igdit.cli", "fit", "--config", str(config), "--data.root", str(digits_root),
           "--trainer.devices", "2", "--trainer.default_root_dir", str(tmp_path / "runs"),
           "--trainer.logger.init_args.tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=480, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("== igdit run finished ==") == 1
    last = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), map_location="cpu", weights_only=True)
    assert last["global_step"] == 4
