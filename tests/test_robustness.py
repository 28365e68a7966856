"""Faults a long run meets, and the conventions users of Lightning, MLflow and torch expect: divergence stops a run
with one line, bad input never gets a traceback, a checkpoint never runs code, MLflow runs are named and created
only when a run starts."""
import errno
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning
import pytest
import torch
import yaml

from igdit.callbacks import DivergenceGuard
from igdit.cli import main
from igdit.config import TrainingStopped
from igdit.data import load_meta
from igdit.tracking import MLflowLogger, default_tracking_uri

from helpers import REPO, short_config, tiny_module


def _fit(config: Path, root: Path, data: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(config), "--data.root", str(data), "--trainer.default_root_dir", str(root / "runs"),
            "--trainer.logger.init_args.tracking_uri", f"sqlite:///{root / 'mlflow.db'}", *extra]


# ---- divergence ----------------------------------------------------------------------------------------------
class _Trainer:
    global_step, checkpoint_callback = 0, None


def test_the_divergence_guard_stops_a_loss_that_runs_away_and_only_then():
    guard = DivergenceGuard(factor=10.0, patience=3, window=20, warmup_steps=5)
    trainer = _Trainer()
    for step in range(30):  # a noisy but healthy run
        trainer.global_step = step
        guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(1.0 + 0.5 * (step % 3))}, None, step)
    guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(50.0)}, None, 30)  # one spike is allowed
    guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(1.0)}, None, 31)
    assert not guard.suspicious
    with pytest.raises(TrainingStopped, match=r"diverged at step 34: .*stayed above .*its running median"):
        for step in range(32, 40):  # 1e3 runs away from the median (about 1.5) but stays below the ceiling (1e4)
            trainer.global_step = step
            guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(1e3)}, None, step)
    assert guard.suspicious  # while it ran away, checkpoints waited


def test_the_divergence_guard_stops_a_blow_up_on_the_first_steps():
    """lr 1e6 took the loss from 2.6 to 1.7e12 at step 2: a median that needs 100 steps of history is itself ~1e28 by
    then. The ceiling stops it at once, and a run-away from the first steps' loss stops before the median has any."""
    trainer = _Trainer()
    guard = DivergenceGuard()  # the defaults every shipped YAML uses
    with pytest.raises(TrainingStopped, match=r"diverged at step 2: loss 1\.7e\+12 is above DivergenceGuard.ceiling"):
        for step, loss in enumerate([2.57, 2.4, 1.7e12]):
            trainer.global_step = step
            guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, step)
    guard = DivergenceGuard(patience=3, early_steps=5)
    with pytest.raises(TrainingStopped, match=r"diverged at step 7: .*the median 2\.5 of the first 5 steps"):
        for step, loss in enumerate([2.6, 2.5, 2.4, 2.5, 2.6, 900.0, 5000.0, 8000.0, 9000.0]):  # all below 1e4
            trainer.global_step = step
            guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, step)
    healthy = DivergenceGuard(patience=3, early_steps=5)
    for step, loss in enumerate([2.6, 2.5, 2.4, 2.5, 2.6, 30.0, 1.2, 200.0, 1.1]):  # spikes below 100x, or alone
        trainer.global_step = step
        healthy.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, step)


def test_every_experiment_that_trains_carries_a_divergence_guard():
    configs = [c for c in sorted((REPO / "experiments").glob("*.yaml")) if "stages" not in yaml.safe_load(c.read_text())]
    assert len(configs) >= 25
    missing = [c.name for c in configs if not any(cb["class_path"] == "igdit.callbacks.DivergenceGuard"
                                                  for cb in yaml.safe_load(c.read_text())["trainer"]["callbacks"])]
    assert missing == []


def test_the_divergence_guard_reads_a_negative_loss_as_signed():
    """The dispersive loss makes the total negative: a healthy negative loss is not a divergence (10 x a negative
    median is far below it), a rise to well above it is."""
    guard = DivergenceGuard(factor=10.0, patience=3, window=20, warmup_steps=5)
    trainer = _Trainer()
    for step in range(60):  # what the study's dispersive arm logged: about -1.2, drifting to -1.65
        trainer.global_step = step
        guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(-1.2 - 0.01 * step)}, None, step)
    assert not guard.suspicious
    with pytest.raises(TrainingStopped, match=r"diverged at step 6\d"):
        for step in range(60, 70):
            trainer.global_step = step
            guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(50.0)}, None, step)


def test_a_non_finite_loss_stops_before_the_weights_change_with_one_line():
    module = tiny_module()
    trainer = type("T", (), {"global_step": 0, "training": True, "callbacks": [],
                             "checkpoint_callback": type("C", (), {"last_model_path": "runs/x/last.ckpt"})()})()
    module._trainer = trainer
    module.train_generator = torch.Generator().manual_seed(0)
    before = [p.clone() for p in module.parameters()]
    with pytest.raises(TrainingStopped) as err:
        module.training_step((torch.full((4, 1, 8, 8), float("nan")), torch.zeros(4, dtype=torch.long)), 0)
    assert "non-finite training loss" in str(err.value) and "runs/x/last.ckpt" in str(err.value)
    assert "\n" not in str(err.value) and all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


@pytest.mark.slow
def test_lr_1e6_stops_within_ten_steps_with_one_line_and_a_failed_run(tmp_path, digits_root, capsys):
    """What the probe saw: loss 2.57 -> 1.7e12 at step 2, ~1e28 by step 200, exit 0. The default guard (every shipped
    YAML's) stops it on its first steps."""
    config = short_config(tmp_path / "c.yaml", max_steps=200, every=10, samples_per_class=1, grid_steps=2)
    code = main(_fit(config, tmp_path, digits_root, "--model.optimizer.init_args.lr", "1e6"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err.startswith("error: ") and ("diverged" in err or "non-finite" in err), err
    assert int(re.search(r"at step (\d+)", err).group(1)) <= 10 and "checkpoint" in err
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("igdit-digits").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


# ---- checkpoints are written whole ------------------------------------------------------------------------------
def _state(step: int) -> dict:
    return {"state_dict": {"w": torch.full((256, 1024), float(step))}, "hyper_parameters": {}, "global_step": step}


def _half_then(failure, save=None):
    """A torch.save that writes half of the bytes, then meets ``failure`` (a full disk; a stall to be killed in)."""
    real = save or torch.save

    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real(obj, buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        failure()
        f.write(data[len(data) // 2:])
    return save


def _full_disk():
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    from igdit.checkpoints import save_atomically

    path = tmp_path / "checkpoints" / "last.ckpt"
    save_atomically(_state(1), path)
    monkeypatch.setattr(torch, "save", _half_then(_full_disk))
    with pytest.raises(OSError) as err:
        save_atomically(_state(2), path)
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert torch.load(path, weights_only=True)["global_step"] == 1  # the previous checkpoint, whole
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # and nothing half-written beside it


def test_a_write_the_kernel_refuses_is_reported_with_its_errno(tmp_path):
    """A real failed write (a file-size limit stands in for a full disk: no tmpfs without root): torch's zip writer
    reports it as "enforce fail ... unexpected pos", and the save says what the kernel said."""
    script = ("import resource, signal, sys, torch\n"
              "from igdit.checkpoints import save_atomically\n"
              "save_atomically({'w': torch.zeros(10), 'global_step': 1}, sys.argv[1])\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
              "try:\n"
              "    save_atomically({'w': torch.zeros(1_000_000), 'global_step': 2}, sys.argv[1])\n"
              "except OSError as err:\n"
              "    print(err.errno, err.strerror)\n")
    path = tmp_path / "last.ckpt"
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.stdout.split()[:1] == [str(errno.EFBIG)], done.stdout + done.stderr[-2000:]
    assert torch.load(path, weights_only=True)["global_step"] == 1 and [p.name for p in tmp_path.iterdir()] == \
        ["last.ckpt"]


def test_a_save_killed_halfway_leaves_the_previous_checkpoint_and_nothing_outside_its_folder(tmp_path):
    """SIGKILL during a save left an unreadable last.ckpt and a 30 MB orphan in /tmp when the run folder was on
    another filesystem (Lightning's writer moved a temporary file from /tmp). The temporary file now lives beside the
    checkpoint and replaces it only once whole."""
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    script = ("import sys, time, torch\n"
              "sys.path.insert(0, sys.argv[2])\n"
              "from test_robustness import _half_then, _state\n"
              "from igdit.checkpoints import save_atomically\n"
              "save_atomically(_state(1), sys.argv[1])\n"
              "torch.save = _half_then(lambda: (print('halfway', flush=True), time.sleep(120)))\n"
              "save_atomically(_state(2), sys.argv[1])\n")
    temp = tmp_path / "tmp"
    temp.mkdir()
    process = subprocess.Popen([sys.executable, "-c", script, str(path), str(REPO / "tests")], stdout=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(temp)})
    assert process.stdout.readline().strip() == "halfway"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    leftovers = [p.name for p in path.parent.iterdir() if p.name != "last.ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.") and not any(temp.iterdir())
    from igdit.checkpoints import save_atomically

    save_atomically(_state(3), path)  # the next save of the file clears what the killed one left
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    assert torch.load(path, weights_only=True)["global_step"] == 3


@pytest.mark.slow
def test_a_full_disk_stops_the_run_in_one_line_naming_the_last_good_checkpoint_and_fails_the_run(
        tmp_path, digits_root, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from igdit.resume import resolve_resume

    config = short_config(tmp_path / "c.yaml", max_steps=20, every=10, samples_per_class=1, grid_steps=2)
    real = torch.save

    def disk_fills_after_step_10(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("global_step", 0) >= 20:
            return _half_then(_full_disk, real)(obj, f, *args, **kwargs)
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_after_step_10)
    code = main(_fit(config, tmp_path, digits_root))
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: could not write the checkpoint ") and len(err[-1]) < 500
    assert "No space left on device" in err[-1] and re.search(r"the last good one is \S+\.ckpt \(step 10\)", err[-1])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("igdit-digits").experiment_id])
    assert run.info.status == "FAILED"
    folder = tmp_path / "runs" / "igdit-digits" / run.info.run_id / "checkpoints"
    assert all(torch.load(p, weights_only=True)["global_step"] == 10 for p in folder.glob("*.ckpt"))
    assert not [p for p in folder.iterdir() if p.suffix != ".ckpt"]  # no partial file
    from jsonargparse import Namespace

    from igdit.resume import checkpoint_identity

    logger = Namespace(class_path="igdit.tracking.MLflowLogger",
                       init_args=Namespace(experiment_name="igdit-digits", run_id=None))
    last = Namespace(ckpt_path="last", trainer=Namespace(default_root_dir=str(tmp_path / "runs"), logger=logger,
                                                         max_steps=20))
    identity = checkpoint_identity(torch.load(folder / "last.ckpt", weights_only=True))
    assert torch.load(resolve_resume(last, identity), weights_only=True)["global_step"] == 10  # resumable from there


# ---- checkpoints: the final step, and never code ---------------------------------------------------------------
@pytest.mark.slow
def test_the_final_step_is_saved_as_last_with_raw_and_ema_weights_apart(tmp_path, digits_root):
    config = short_config(tmp_path / "c.yaml", max_steps=25, every=10, samples_per_class=1, grid_steps=2)
    assert main(_fit(config, tmp_path, digits_root)) == 0
    last = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), weights_only=True)
    assert last["global_step"] == 25  # not 20, the last multiple of the checkpoint interval
    name = "backbone.final_layer.linear.weight"
    assert not torch.equal(last["state_dict"][name], last["current_model_state"][name])


class Payload:
    """What a malicious checkpoint carries: unpickling it would create a file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


@pytest.fixture()
def payload_checkpoint(tmp_path, digits_root):
    module = tiny_module()
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__, "igdit_data_meta": load_meta(digits_root),
                "surprise": Payload(str(tmp_path / "pwned"))}, path)
    return path


def test_no_command_runs_the_code_a_checkpoint_carries(payload_checkpoint, tmp_path, digits_root, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # flips torch.load's default to unpickling anything
    ckpt, marker = str(payload_checkpoint), tmp_path / "pwned"
    config = short_config(tmp_path / "c.yaml", max_steps=5, every=5, samples_per_class=1, grid_steps=2)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "study": {"name": "s", "storage": f"sqlite:///{tmp_path / 'o.db'}", "n_trials": 1},
        "kind": "sampling", "base": str(config), "objective": {"setting": "ig"},
        "search_space": {"guidance.ig.scale": {"type": "float", "low": 1.0, "high": 2.0}},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"}}))
    commands = [
        ["sample", "--ckpt", ckpt, "--out", str(tmp_path / "s")],
        ["sample", "--ckpt", str(_clean(tmp_path, digits_root)), "--ag.scale", "2", "--ag.ckpt", ckpt,
         "--out", str(tmp_path / "s2")],
        ["eval", "--ckpt", ckpt, "--experiment", str(config), "--", "--data.root", str(digits_root)],
        ["sweep", str(sweep), "--ckpt", ckpt],
        _fit(config, tmp_path, digits_root, "--ckpt_path", ckpt),
        ["validate", *_fit(config, tmp_path, digits_root, "--ckpt_path", ckpt)[1:]],
        ["import-ckpt", "--from", "official-sit", ckpt, "--model", "SiT-T/2", "--exit", "2", "--out",
         str(tmp_path / "i.ckpt")],
    ]
    for command in commands:
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and ("weights_only" in err or "Unsupported global" in err), (command, err)
        assert err.endswith("(the file would run code when unpickled)"), err  # whole sentences, not cut at 160
        assert not marker.exists(), command


def _clean(tmp_path, digits_root) -> Path:
    module = tiny_module()
    path = tmp_path / "clean.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__, "igdit_data_meta": load_meta(digits_root)}, path)
    return path


# ---- bad input: one line, nothing written -------------------------------------------------------------------------
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, digits_root, capsys, own_working_directory):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    cfg = yaml.safe_load((REPO / "experiments/default.yaml").read_text())
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("FIDCallback"):
            cb["init_args"]["settings"]["ig"]["ig"]["scale"] = -2
    bad_fid = tmp_path / "bad_fid.yaml"
    bad_fid.write_text(yaml.safe_dump(cfg))
    good = _clean(tmp_path, digits_root)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "a_file").write_text("mine")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "part-00000-of-00001.npz").write_bytes(b"mine")
    cases = [
        (["fit", "--config", str(empty)], "--config"),
        (["fit", "--config", str(bad_fid), "--data.root", str(digits_root)], "FIDCallback.settings.ig.ig.scale"),
        (["fit", "--config", str(REPO / "experiments/default.yaml"), "--data.root", str(digits_root),
          "--trainer.precision", "17"], "trainer.precision"),
        (["sample", "--ckpt", str(empty)], "--ckpt"),
        (["sample", "--ckpt", str(truncated)], "--ckpt"),
        (["sample", "--ckpt", str(good), "--out", str(tmp_path / "a_file")], "--out"),
        (["sample", "--ckpt", str(good), "--out", str(foreign)], "--out"),
        (["eval", "--ckpt", str(truncated), "--experiment", str(REPO / "experiments/default.yaml")], "--ckpt"),
    ]
    for command, field in cases:
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {field}") and len(err[0]) < 400, (command, err)
    assert (foreign / "part-00000-of-00001.npz").read_bytes() == b"mine"
    assert (tmp_path / "a_file").read_text() == "mine"
    assert not any(own_working_directory.iterdir())  # no mlflow.db, no runs/


def _unused_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again: nothing answers there


BAD_FIT_VALUES = [
    (["--trainer.max_steps", "0"], "trainer.max_steps"),  # trained nothing and drew a sample grid
    (["--data.batch_size", "100000"], "data.batch_size"),  # OOM-killed after 4 minutes at 23 GB
    (["--trainer.val_check_interval", "500"], "FIDCallback.every_n_steps"),  # FID asked every 10 steps ran every 500
    (["--trainer.logger.init_args.tracking_uri", "sqlite:///{tmp}/a_file/mlflow.db"], "trainer.logger.init_args"),
    (["--trainer.logger.init_args.tracking_uri", "http://127.0.0.1:{port}"], "trainer.logger.init_args"),
]
if not torch.cuda.is_available():
    BAD_FIT_VALUES.append((["--trainer.accelerator", "gpu"], "trainer.accelerator"))


@pytest.mark.parametrize("extra,field", BAD_FIT_VALUES, ids=[e[0] + "=" + e[-1].rsplit("/", 1)[-1][:12]
                                                             for e, _ in BAD_FIT_VALUES])
def test_bad_fit_values_are_one_line_before_any_compute(extra, field, tmp_path, digits_root, capsys):
    (tmp_path / "a_file").write_text("mine")
    config = short_config(tmp_path / "c.yaml", max_steps=20, every=10, samples_per_class=1, grid_steps=2)
    extra = [e.format(tmp=tmp_path, port=_unused_port()) for e in extra]
    start = time.monotonic()
    code = main(["fit", "--config", str(config), "--data.root", str(digits_root), "--trainer.default_root_dir",
                 str(tmp_path / "runs"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"error: {field}") and len(err[-1]) < 400, err[-5:]
    assert time.monotonic() - start < 60  # an unreachable server took 254 s of retries
    assert not (tmp_path / "runs").exists() and (tmp_path / "a_file").read_text() == "mine"


def test_a_text_file_as_a_checkpoint_is_one_line_in_every_command_that_reads_one(tmp_path, digits_root, capsys,
                                                                                 own_working_directory):
    """A 6-byte text file gave a 29-line `KeyError: 101` in sample, eval, import-ckpt and as an ST teacher; a refused
    teacher left a FAILED MLflow run behind."""
    text = tmp_path / "notes.ckpt"
    text.write_text("hello\n")
    commands = [
        (["sample", "--ckpt", str(text), "--out", str(tmp_path / "s")], "--ckpt"),
        (["eval", "--ckpt", str(text), "--experiment", str(REPO / "experiments/default.yaml")], "--ckpt"),
        (["import-ckpt", "--from", "official-sit", str(text), "--out", str(tmp_path / "i.ckpt")], "--from official-sit"),
        (["fit", "--config", str(REPO / "experiments/st_stage2_digits.yaml"), "--data.root", str(digits_root),
          "--model.terms.self_guided.teacher_ckpt", str(text)], "model.terms.self_guided.teacher_ckpt"),
    ]
    if not torch.cuda.is_available():
        commands.append((["sample", "--ckpt", str(_clean(tmp_path, digits_root)), "--device", "cuda", "--out",
                          str(tmp_path / "s")], "--device"))
    for command, field in commands:
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: {field}: ") and len(err[-1]) < 400, (command, err[-3:])
        assert "KeyError(101)" not in err[-1] or "is not a torch checkpoint" in err[-1]
    assert not any(own_working_directory.iterdir())  # no mlflow.db, no runs/: the refused teacher left no run


@pytest.mark.parametrize("change,field", [
    ({"FIDCallback": {"reference": "no_such_reference.npz"}}, "FIDCallback.reference"),
    ({"monitor": "val/los"}, "ModelCheckpoint.monitor"),  # a typo Lightning found at the first validation
])
def test_a_refused_callback_setting_leaves_no_run_behind(change, field, tmp_path, digits_root, capsys,
                                                         own_working_directory):
    cfg = yaml.safe_load(short_config(tmp_path / "c.yaml", max_steps=20, every=10, samples_per_class=1,
                                      grid_steps=2).read_text())
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("FIDCallback") and "FIDCallback" in change:
            cb["init_args"].update(change["FIDCallback"])
        if "monitor" in change and (cb.get("init_args") or {}).get("monitor"):  # the best-FD checkpoint's
            cb["init_args"]["monitor"] = change["monitor"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(tmp_path / "c.yaml"), "--data.root", str(digits_root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {field}: "), err[-3:]
    assert not any(own_working_directory.iterdir())  # no mlflow.db, no runs/


# ---- MLflow conventions -----------------------------------------------------------------------------------------
def test_mlflow_tracking_uri_is_honoured_and_runs_get_distinct_names(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    assert default_tracking_uri() == f"sqlite:///{tmp_path / 'elsewhere.db'}"
    lightning.seed_everything(0)
    first = MLflowLogger(experiment_name="e")
    lightning.seed_everything(0)
    second = MLflowLogger(experiment_name="e")
    assert first._run_name != second._run_name
    assert not (tmp_path / "elsewhere.db").exists()  # nothing is created before the run logs
    first.log_hyperparams({"a": 1})
    assert (tmp_path / "elsewhere.db").exists()
    fixed = [MLflowLogger(experiment_name="e", run_name="st-stage2")._run_name for _ in range(2)]  # a YAML's run_name
    assert fixed[0] != fixed[1] and all(name.startswith("st-stage2-") for name in fixed)


def test_a_reopened_run_refused_at_start_keeps_the_status_it_had(tmp_path):
    """A resume refused once fit had started flipped a FINISHED run to FAILED."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    first = MLflowLogger(experiment_name="e", tracking_uri=uri)
    first.log_hyperparams({"a": 1})
    first.finalize("success")
    reopened = MLflowLogger(experiment_name="e", tracking_uri=uri, run_id=first.run_id)
    client = reopened.experiment  # a resumed run is marked RUNNING again when it is first touched
    assert client.get_run(first.run_id).info.status == "RUNNING"
    reopened.finalize("failed")  # what Lightning does with any exception
    reopened.restore_status()  # what `igdit fit` does when the exception was a refusal (ConfigError)
    assert client.get_run(first.run_id).info.status == "FINISHED"
    reopened.close_as("KILLED")
    assert client.get_run(first.run_id).info.status == "KILLED"


def test_the_ema_copy_of_the_module_shares_the_optimiser_factory_instead_of_copying_it():
    """`--trainer.devices 2` on CPU: EMAWeightAveraging's deepcopy of the module reached the CLI's launcher through the
    factory and failed with "cannot pickle '_thread.lock' object" (242 lines)."""
    import copy
    import threading
    from functools import partial

    module = tiny_module()
    lock = threading.Lock()
    module.optimizer_factory.factory = partial(module.optimizer_factory.factory, __lock=lock)
    copied = copy.deepcopy(module)
    assert copied.optimizer_factory is module.optimizer_factory
    assert copied.backbone is not module.backbone and torch.equal(
        copied.backbone.final_layer.linear.weight, module.backbone.final_layer.linear.weight)


@pytest.mark.slow
def test_two_fits_started_at_once_in_an_empty_folder_both_run(tmp_path, digits_root):
    config = short_config(tmp_path / "c.yaml", max_steps=3, every=3, samples_per_class=1, grid_steps=2)
    folder = tmp_path / "empty"
    folder.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "igdit.cli", "fit", "--config", str(config), "--data.root", str(digits_root)]
    processes = [subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-2000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("igdit-digits").experiment_id])
    assert len(runs) == 2 and len({r.info.run_name for r in runs}) == 2
