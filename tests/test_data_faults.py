"""Data faults are visible and bounded: skipped samples are counted and logged without pausing, a missing shard is
an error, checksums find rewritten bytes, a run that skips too much stops, caches notice a changed shard."""
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from igdit.cli import main
from igdit.config import ConfigError, TrainingStopped
from igdit.data import LatentDataModule, load_meta
from igdit.data.shards import file_sha256
from igdit.metrics.evaluate import data_fingerprint


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
