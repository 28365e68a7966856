"""Data faults are visible and bounded: skipped samples are counted and logged without pausing, a missing shard is
an error, checksums find rewritten bytes, a run that skips too much stops, caches notice a changed shard."""
import io
import json
import shutil
import tarfile
import warnings
from pathlib import Path

import pytest
import torch

from igdit.cli import main
from igdit.config import ConfigError, TrainingStopped
from igdit.data import LatentDataModule, load_meta
from igdit.data.shards import file_sha256
from igdit.metrics.evaluate import data_fingerprint

REPO = Path(__file__).resolve().parents[1]


def _copy(digits_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "digits"
    shutil.copytree(digits_root, root, ignore=shutil.ignore_patterns("fid_refs"))
    return root


def _corrupt_latents(shard: Path, count: int, vouched: bool = False) -> None:
    """Rewrite the first ``count`` samples' latent.npy of a shard with bytes that are not an npy array; ``vouched``:
    record the new bytes in meta.json, as if the build had written them (damage that checksums cannot see: a build
    before checksums, a shard named outside data.root), so that only decoding meets it."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    bad = 0
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name.endswith("latent.npy") and bad < count:
                data, bad = b"garbage" * 10, bad + 1
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    if vouched:
        _vouch(shard)


def _vouch(shard: Path) -> None:
    """Record a shard's present bytes in meta.json (its checksum and size), as if the build had written them."""
    meta_path = shard.parent / "meta.json"
    meta = json.loads(meta_path.read_text())
    split, index = shard.stem.split("-")
    meta["shard_sha256"][split][int(index)] = file_sha256(shard)
    meta["shard_bytes"][split][int(index)] = shard.stat().st_size
    meta_path.write_text(json.dumps(meta))


def test_a_shard_meta_json_lists_but_the_folder_lacks_is_an_error(digits_root, tmp_path):
    root = _copy(digits_root, tmp_path)
    (root / "train-000003.tar").unlink()
    with pytest.raises(ConfigError, match=r"^data.root: .*misses train-000003.tar \(1 of \d+ train shards"):
        LatentDataModule(root=str(root))


def test_data_verify_finds_rewritten_bytes_and_missing_shards(digits_root, tmp_path, capsys):
    root = _copy(digits_root, tmp_path)
    assert main(["data", "verify", str(root)]) == 0
    assert capsys.readouterr().out.strip().startswith("ok: ")
    _corrupt_latents(root / "val-000000.tar", 1)
    (root / "train-000001.tar").unlink()
    assert main(["data", "verify", str(root)]) == 1
    out = capsys.readouterr().out
    assert "val-000000.tar: checksum differs" in out and "train-000001.tar: missing" in out and "FAILED" in out
    assert len(load_meta(root)["shard_sha256"]["train"]) == load_meta(root)["num_shards"]["train"]


def test_skipped_samples_are_counted_and_logged_without_pausing(digits_root, tmp_path, monkeypatch, caplog):
    root = _copy(digits_root, tmp_path)
    _corrupt_latents(root / "val-000000.tar", 5, vouched=True)
    monkeypatch.setattr("time.sleep", lambda s: (_ for _ in ()).throw(AssertionError("slept")))
    dm = LatentDataModule(root=str(root), batch_size=16)
    dm.setup("validate")
    with caplog.at_level("WARNING"):
        seen = sum(x.shape[0] for x, _ in dm.val_dataloader())
    assert seen == load_meta(root)["num_samples"]["val"] - 5 and dm.skips.skipped == 5
    lines = [r.getMessage() for r in caplog.records if "skipped a sample" in r.getMessage()]
    assert len(lines) == 5 and all("val-000000.tar" in line for line in lines)


def test_a_run_that_skips_too_much_stops_with_one_line(digits_root, tmp_path):
    root = _copy(digits_root, tmp_path)
    for shard in sorted(root.glob("train-*.tar"))[:3]:
        _corrupt_latents(shard, 50, vouched=True)
    dm = LatentDataModule(root=str(root), batch_size=16, max_skipped_fraction=0.05)
    dm.setup("fit")
    trainer = type("T", (), {"training": True, "logger": None, "global_step": 0, "checkpoint_callback": None})()
    dm.trainer = trainer
    with pytest.raises(TrainingStopped, match=r"could not be read .*max_skipped_fraction 0.05.*igdit data verify"):
        for step, batch in enumerate(dm.train_dataloader()):
            trainer.global_step = step
            dm.on_before_batch_transfer(batch, 0)


def test_a_truncated_shard_is_refused_before_compute_and_a_rebuilt_one_changes_the_cache_key(digits_root, tmp_path):
    root = _copy(digits_root, tmp_path)
    before = data_fingerprint(LatentDataModule(root=str(root)), "train")
    shard = root / "train-000002.tar"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:-4096])
    with pytest.raises(ConfigError, match=r"^data.root: .*train-000002.tar of \d+ bytes, meta.json says \d+"):
        LatentDataModule(root=str(root))
    _vouch(shard)  # as if a build had written it so: meta.json describes the new bytes
    assert data_fingerprint(LatentDataModule(root=str(root)), "train") != before


def _zero_latents(shard: Path) -> None:
    """Overwrite every latent of a shard with zeros, keeping its size (what a faulty copy or disk can do)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name.endswith("latent.npy"):
                data = data[:128] + bytes(len(data) - 128)  # the npy header stays, the values become 0
            tar.addfile(member, io.BytesIO(data))


def test_a_shard_whose_bytes_changed_stops_training_in_one_line_naming_it(digits_root, tmp_path):
    """A shard whose values were zeroed trained with exit code 0 and no warning (`data verify` noticed, training
    did not): each shard is checked against meta.json's SHA-256 when a stream first opens it."""
    root = _copy(digits_root, tmp_path)
    shard = root / "train-000004.tar"
    size = shard.stat().st_size
    _zero_latents(shard)
    assert shard.stat().st_size == size  # the size check at start cannot see it
    dm = LatentDataModule(root=str(root), batch_size=16)
    dm.setup("fit")
    with pytest.raises(TrainingStopped) as err:
        for _ in dm.train_dataloader():
            pass
    message = str(err.value)
    assert message.startswith(f"data: shard {shard} does not hold the bytes the build wrote") and "\n" not in message
    assert f"igdit data verify {root}" in message


def test_the_one_line_of_a_stop_raised_in_a_dataloader_worker_is_its_message():
    """A DataLoader worker's exception comes back re-created around the worker's whole traceback."""
    from igdit.commands import stopped_line

    wrapped = TrainingStopped("Caught TrainingStopped in DataLoader worker process 0.\nOriginal Traceback (most recent "
                              "call last):\n  File \"x.py\", line 1, in f\n    raise\nigdit.config.TrainingStopped: data: "
                              "shard a.tar does not hold the bytes the build wrote; restore it\n")
    assert stopped_line(wrapped) == "data: shard a.tar does not hold the bytes the build wrote; restore it"


@pytest.mark.slow
def test_a_fit_on_a_zeroed_shard_stops_with_one_line(digits_root, tmp_path, capsys):
    from helpers import short_config

    root = _copy(digits_root, tmp_path)
    for shard in sorted(root.glob("train-*.tar")):
        _zero_latents(shard)  # every shard, so that the first one a DataLoader worker opens is one
    config = short_config(tmp_path / "c.yaml", max_steps=20, every=10, samples_per_class=1, grid_steps=2)
    code = main(["fit", "--config", str(config), "--data.root", str(root), "--trainer.default_root_dir",
                 str(tmp_path / "runs"), "--trainer.logger.init_args.tracking_uri", f"sqlite:///{tmp_path / 'm.db'}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err.startswith(f"error: data: shard {root}/train-0000") and "SHA-256" in err, err


def test_a_shard_meta_json_does_not_list_is_refused_and_verify_names_it(digits_root, tmp_path, capsys):
    """A train-*.tar present in the folder but not in meta.json was trained on, and `data verify` said nothing."""
    root = _copy(digits_root, tmp_path)
    count = load_meta(root)["num_shards"]["train"]
    extra = root / f"train-{count:06d}.tar"
    shutil.copy(root / "train-000000.tar", extra)
    with pytest.raises(ConfigError, match=rf"^data.root: .*holds {extra.name}, which .*meta.json does not list"):
        LatentDataModule(root=str(root))
    assert main(["data", "verify", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"{extra.name}: not listed in meta.json" in out and "1 shard file(s) meta.json does not list" in out


def test_a_few_bad_samples_train_on_and_evaluation_reads_do_not_count(digits_root, tmp_path):
    """5 bad samples of 1,617 (0.3%) stopped a run at step 0: the limit was taken over the samples read so far, and the
    FID reference's reads counted too. Now: training reads only, against at least an epoch's training samples."""
    root = _copy(digits_root, tmp_path)
    _corrupt_latents(root / "train-000000.tar", 5, vouched=True)
    _corrupt_latents(root / "val-000000.tar", 20, vouched=True)
    dm = LatentDataModule(root=str(root), batch_size=64, max_skipped_fraction=0.01)
    dm.setup("fit")
    trainer = type("T", (), {"training": True, "logger": None, "global_step": 0, "checkpoint_callback": None})()
    dm.trainer = trainer
    list(dm.val_dataloader())  # a validation pass (or the FID reference) meets 20 bad samples first
    seen = 0
    for step, batch in enumerate(dm.train_dataloader()):  # one epoch
        trainer.global_step = step
        dm.on_before_batch_transfer(batch, 0)
        seen += batch[0].shape[0]
    assert dm.train_skips.skipped == 5 and dm.skips.skipped == 25 and seen == dm.steps_per_epoch * 64


def test_a_build_with_no_readable_image_fails_in_one_line_and_writes_no_meta(tmp_path, capsys):
    images = tmp_path / "images"
    for name in ("cat", "dog"):
        (images / name).mkdir(parents=True)
        for i in range(21):
            (images / name / f"{i}.png").write_bytes(bytes(range(100)))  # not an image
    out = tmp_path / "built"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["data", "build", f"imagefolder:{images}", str(out), "--resolution", "16", "--no-progress"]) == 2
    unreadable = [str(w.message) for w in caught if "skipped unreadable image" in str(w.message)]
    assert 1 <= len(unreadable) <= 2 and all(" more, all listed in .build/" in w for w in unreadable)  # not 42 lines
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: source: 'imagefolder:{images}' is not allowed; gave no readable image") and \
        "42 unreadable" in err
    assert not (out / "meta.json").exists()
    assert main(["fit", "--config", str(REPO / "experiments/default.yaml"), "--data.root", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: data.root") and "its build read no image" in err and "--resume" not in err
