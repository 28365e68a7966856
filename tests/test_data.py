"""Digits -> latent shards -> LatentDataModule: what the shards hold and what each rank and worker reads."""
from collections import Counter
from itertools import islice
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds

from igdit.config import ConfigError
from igdit.data import (LatentDataModule, LatentNormalizer, build_dataset, build_encoder, images_to_unit,
                        load_meta, load_source, unit_to_uint8)
from igdit.cli import main as igdit


def data_main(argv):
    return igdit(["data", *argv])


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    build_dataset("digits", root, progress=False)
    return root


def _read(root, split):
    """Every sample of a split straight from disk: {key: (latent ndarray as stored, label)}."""
    urls = sorted(str(p) for p in root.glob(f"{split}-*.tar"))
    samples = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.decode())
    out = {}
    for s in samples:
        assert s["__key__"] not in out
        out[s["__key__"]] = (s["latent.npy"], s["cls"])
    return out


def _read_one(url):
    """Keys of one shard in on-disk order."""
    return [s["__key__"] for s in wds.DataPipeline(wds.SimpleShardList([str(url)]), wds.tarfile_to_samples())]


def _keys(stream, n):
    return [key for key, _, _ in (next(stream) for _ in range(n))]


# ---- build ----------------------------------------------------------------------------------------------
def test_build_writes_stratified_float16_shards_of_the_real_digits(built):
    meta = load_meta(built)
    train, val = _read(built, "train"), _read(built, "val")
    assert len(train) + len(val) == 1797
    assert meta["num_samples"] == {"train": len(train), "val": len(val)}
    assert meta["num_shards"] == {"train": 17, "val": 2} and len(list(built.glob("*.tar"))) == 19
    assert not set(train) & set(val)

    source = load_source("digits")
    labels = source.labels.numpy()
    val_per_class = Counter(int(labels[int(k)]) for k in val)
    for c, total in Counter(labels.tolist()).items():  # stratified: ~10% of every class, none missing
        assert abs(val_per_class[c] - 0.1 * total) <= 1

    for split in (train, val):
        for key, (latent, label) in split.items():
            row = int(key)
            assert latent.dtype == np.float16 and latent.shape == (1, 8, 8)
            assert np.abs(latent).max() <= 1.0
            assert label == labels[row]
            # identity encoder: the stored latent decodes to exactly the source's uint8 image
            image = unit_to_uint8(torch.from_numpy(latent.astype(np.float32))[None])[0]
            assert torch.equal(image, source.images[row])


def test_digits_are_sklearns_17_grey_levels_as_uint8():
    from sklearn.datasets import load_digits

    source = load_source("digits")
    assert source.images.shape == (1797, 1, 8, 8) and source.images.dtype == torch.uint8
    assert sorted(source.images.unique().tolist()) == [round(v * 255 / 16) for v in range(17)]
    assert torch.equal(source.labels, torch.from_numpy(load_digits().target).long())
    with pytest.raises(ConfigError, match="source"):
        load_source("cifar")


def test_second_build_into_the_same_folder_is_refused_and_deletes_nothing(built, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in built.iterdir()}
    with pytest.raises(ConfigError) as err:
        build_dataset("digits", built, progress=False)
    assert err.value.field == "out_dir" and "\n" not in str(err.value)
    assert data_main(["build", "digits", str(built)]) == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.startswith("error: out_dir:") and "\n" not in stderr
    assert {p.name: p.stat().st_mtime_ns for p in built.iterdir()} == before


def test_upsampling_to_16_is_recorded_in_meta_and_shapes(tmp_path, capsys):
    out = tmp_path / "digits16"
    assert data_main(["build", "digits", str(out), "--resolution", "16", "--samples_per_shard", "500"]) == 0
    assert "meta.json" in capsys.readouterr().out
    meta = load_meta(out)
    assert meta["upsampled"] is True and meta["resolution"] == 16
    assert meta["latent_shape"] == [1, 16, 16] and meta["image_shape"] == [1, 16, 16]
    assert meta["source_image_shape"] == [1, 8, 8]
    x, y = next(iter(LatentDataModule(str(out), batch_size=8, shuffle_buffer=10).val_dataloader()))
    assert x.shape == (8, 1, 16, 16) and x.abs().max() <= 1


# ---- encoder and normaliser -----------------------------------------------------------------------------
def test_encode_normalise_denormalise_decode_round_trip_is_exact():
    u = torch.arange(256, dtype=torch.uint8).view(4, 1, 8, 8)
    assert torch.equal(unit_to_uint8(images_to_unit(u)), u)

    encoder, normalizer = build_encoder("identity"), LatentNormalizer([0.0], [1.0])
    x = images_to_unit(load_source("digits").images[:64])
    assert torch.equal(encoder.decode(normalizer.denormalize(normalizer.normalize(encoder.encode(x)))), x)

    # a non-trivial per-channel normaliser is inverted by the same object, also after a trip through meta.json
    z = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    norm = LatentNormalizer.from_dict(LatentNormalizer([0.1, -0.2, 0.3], [0.18215, 2.0, 0.5]).to_dict())
    assert torch.allclose(norm.normalize(z)[:, 0], (z[:, 0] - 0.1) * 0.18215)
    torch.testing.assert_close(norm.denormalize(norm.normalize(z)), z)
    with pytest.raises(ConfigError, match="encoder"):
        build_encoder("sd-vae-nope")
    with pytest.raises(ConfigError, match="normalizer.scale"):
        LatentNormalizer([0.0], [0.0])


# ---- the data module -------------------------------------------------------------------------------------
def test_batches_have_the_shapes_and_dtypes_the_model_expects(built):
    dm = LatentDataModule(str(built), batch_size=32, shuffle_buffer=100)
    dm.setup("fit")
    assert dm.latent_shape == (1, 8, 8) and dm.num_classes == 10 and dm.normalizer == LatentNormalizer([0.0], [1.0])
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.long
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,)


def test_global_batch_is_split_across_the_world_and_must_divide(built):
    dm = LatentDataModule(str(built), batch_size=64)
    dm.trainer = SimpleNamespace(world_size=2)
    dm.setup("fit")
    assert dm.per_device_batch_size == 32
    dm = LatentDataModule(str(built), batch_size=33)
    dm.trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ConfigError, match="data.batch_size.*divisible by the world size 2"):
        dm.setup("fit")


def test_missing_data_and_bad_values_fail_in_the_constructor(built, tmp_path):
    with pytest.raises(ConfigError, match="^data.root: .*does not exist; build it with `igdit data build digits"):
        LatentDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="^data.root: .*has no meta.json; build it with `igdit data build digits"):
        LatentDataModule(str(tmp_path))
    with pytest.raises(ConfigError, match="^data.train_shards: .*missing"):
        LatentDataModule(str(built), train_shards="train-{000000..000099}.tar")


def test_check_model_names_the_field_and_both_values(built):
    dm = LatentDataModule(str(built))
    dm.check_model((1, 8, 8), 10)
    with pytest.raises(ConfigError, match=r"^model.in_channels: 4 .*hold 1-channel latents"):
        dm.check_model((4, 8, 8), 10)
    with pytest.raises(ConfigError, match=r"^model.input_size: 32 .*hold 8x8 latents"):
        dm.check_model((1, 32, 32), 10)
    dm.trainer = SimpleNamespace(world_size=1, lightning_module=SimpleNamespace(latent_shape=(1, 8, 8), num_classes=1000))
    with pytest.raises(ConfigError, match=r"^model.num_classes: 1000 .*have 10 classes") as err:
        dm.setup("fit")
    assert "\n" not in str(err.value)


def test_ranks_read_disjoint_shards_that_together_cover_the_training_set(built, monkeypatch):
    all_keys = set(_read(built, "train"))
    dm = LatentDataModule(str(built), shuffle_buffer=200)
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        draws = _keys(iter(dm.train_samples(with_keys=True)), 2000)  # > one pass of either rank's ~800 samples
        seen.append(Counter(draws))
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == all_keys
    assert max(seen[0].values()) >= 2  # the stream went round more than once: infinite, resampled


def test_workers_read_disjoint_shards(built, monkeypatch):
    dm = LatentDataModule(str(built), shuffle_buffer=100)
    monkeypatch.setenv("NUM_WORKERS", "2")
    seen = []
    for worker in (0, 1):
        monkeypatch.setenv("WORKER", str(worker))
        seen.append(set(_keys(iter(dm.train_samples(with_keys=True)), 2000)))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(_read(built, "train"))


def test_training_stream_is_shuffled_reproducible_and_new_each_epoch(built):
    disk_order = [k for url in sorted(built.glob("train-*.tar")) for k in _read_one(url)]
    dm = LatentDataModule(str(built), shuffle_buffer=500, seed=3)
    first_epoch = _keys(iter(dm.train_samples(with_keys=True)), 500)
    assert first_epoch != disk_order[:500]
    assert _keys(iter(LatentDataModule(str(built), shuffle_buffer=500, seed=3).train_samples(True)), 500) == first_epoch
    stream = dm.train_samples(with_keys=True)
    _ = _keys(iter(stream), 10)
    assert _keys(iter(stream), 500) != first_epoch  # a new epoch does not replay the previous one



def test_epoch_has_steps_per_epoch_full_batches_with_real_workers(built):
    dm = LatentDataModule(str(built), batch_size=20, num_workers=2, shuffle_buffer=50, steps_per_epoch=5)
    dm.setup("fit")
    assert dm.steps_per_epoch == 6  # rounded up to a multiple of the 2 workers, the same on every rank
    loader = dm.train_dataloader()
    for _ in range(2):  # persistent workers: a second epoch works and is as long
        batches = list(loader)
        assert len(batches) == 6 and all(x.shape == (20, 1, 8, 8) for x, _ in batches)
    # Lightning shuts persistent workers down at the end of fit; do the same here (left to the garbage
    # collector, torch's worker shutdown waits out its join timeout).
    loader._iterator._shutdown_workers()


def test_validation_is_one_deterministic_pass_over_the_whole_val_set(built, monkeypatch):
    val = _read(built, "val")
    dm = LatentDataModule(str(built), batch_size=64)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # every rank validates on all of it
    passes = [list(dm.val_dataset(with_keys=True)) for _ in range(2)]
    keys = [k for keys, _, _ in passes[0] for k in keys]
    assert sorted(keys) == sorted(val) and len(keys) == len(set(keys)) == 180
    assert [len(k) for k, _, _ in passes[0]] == [64, 64, 52]  # the partial last batch is kept
    for (k0, x0, y0), (k1, x1, y1) in zip(*passes):
        assert k0 == k1 and torch.equal(x0, x1) and torch.equal(y0, y1)


def test_too_few_shards_for_ranks_times_workers_says_how_many_are_needed(built, monkeypatch):
    dm = LatentDataModule(str(built), num_workers=5)
    dm.trainer = SimpleNamespace(world_size=4)
    with pytest.raises(ConfigError, match=r"^data.root: .*holds 17 train shard\(s\); 4 rank\(s\) x 5 worker\(s\).*at least 20"):
        dm.setup("fit")
    dm = LatentDataModule(str(built), train_shards="train-{000000..000002}.tar")
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "WORKER": "0", "NUM_WORKERS": "2"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=r"^data.train_shards: .*holds 3 train shard\(s\).*at least 4"):
        next(iter(dm.train_samples()))


def test_a_corrupt_sample_is_skipped_with_a_warning_not_silently(built, tmp_path, caplog):
    bad = tmp_path / "bad-000000.tar"
    good = np.zeros((1, 8, 8), np.float16)
    with wds.TarWriter(str(bad)) as sink:
        sink.write({"__key__": "00000001", "latent.npy": good, "cls": 1})
        sink.write({"__key__": "00000002", "latent.npy": b"not an npy file", "cls": 2})
        sink.write({"__key__": "00000003", "latent.npy": good, "cls": 3})
    dm = LatentDataModule(str(built), val_shards=str(bad))
    with caplog.at_level("WARNING"):
        batches = list(dm.val_dataset(with_keys=True))
    assert [k for keys, _, _ in batches for k in keys] == ["00000001", "00000003"]
    assert any("skipped sample 00000002 of" in r.getMessage() and "bad-000000.tar" in r.getMessage()
               for r in caplog.records) and dm.skips.skipped == 1


def _numbered_source(n: int):
    """n distinct 1x4x4 images whose first two pixels spell their index (i % 256, i // 256); 4 classes."""
    from igdit.data import ArraySource

    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n) % 256
    images[:, 0, 0, 1] = torch.arange(n) // 256
    return ArraySource(images, torch.arange(n) % 4, ["a", "b", "c", "d"], {"name": "numbered"})


def _index(x: torch.Tensor) -> list[int]:
    pixels = unit_to_uint8(x).long()
    return (pixels[:, 0, 0, 0] + 256 * pixels[:, 0, 0, 1]).tolist()


def test_an_epoch_reads_every_sample_exactly_once_across_two_ranks_and_two_workers(tmp_path, monkeypatch):
    # 80 images -> 72 train in 8 shards of 9: each of 2 ranks x 2 workers holds 2 shards = 18 samples = 3 batches of 6.
    root = tmp_path / "numbered"
    meta = build_dataset(_numbered_source(80), root, samples_per_shard=9, progress=False)
    assert meta["shard_samples"]["train"] == [9] * 8
    train_rows = sorted(int(k) for k in _read(root, "train"))
    epochs = [[], []]
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = LatentDataModule(str(root), batch_size=12, num_workers=2, shuffle_buffer=50, seed=1)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        dm.setup("fit")
        assert dm.per_device_batch_size == 6 and dm.steps_per_epoch == 6
        loader = dm.train_dataloader()
        for epoch in range(2):
            batches = list(loader)
            assert len(batches) == 6  # the same number of steps on both ranks
            epochs[epoch] += [i for x, _ in batches for i in _index(x)]
        loader._iterator._shutdown_workers()
    for seen in epochs:
        assert sorted(seen) == train_rows  # each training sample once: none twice, none skipped
    assert epochs[0] != epochs[1]  # and the second epoch is a new shuffle


def test_default_epoch_never_reads_a_sample_twice_when_shards_are_uneven(built, monkeypatch):
    # 17 shards (16 of 100, one of 17) over 3 ranks hold 600, 517 and 500 samples; per-device batch 42:
    # every rank runs floor(500 / 42) = 11 steps, the most the smallest share gives without rereading.
    dm = LatentDataModule(str(built), batch_size=126, shuffle_buffer=300)
    dm.trainer = SimpleNamespace(world_size=3)
    with pytest.warns(UserWarning, match="17 train shards do not divide among 3 rank.*multiple of 3"):
        dm.setup("fit")
    assert dm.steps_per_epoch == 11
    monkeypatch.setenv("WORLD_SIZE", "3")
    for rank in (0, 1, 2):
        monkeypatch.setenv("RANK", str(rank))
        keys = [k for keys, _, _ in islice(dm.train_samples(with_keys=True).compose(wds.batched(42)), 11) for k in keys]
        assert len(keys) == len(set(keys)) == 11 * 42


def test_latents_read_by_the_fast_path_equal_numpys_own_decoder(built):
    from functools import partial

    from igdit.data.datamodule import _to_tensors, npy_header

    raw = next(iter(wds.DataPipeline(wds.SimpleShardList([str(built / "train-000000.tar")]), wds.tarfile_to_samples())))
    header = npy_header((1, 8, 8))
    assert raw["latent.npy"].startswith(header)  # what the build writes takes the fast path
    fast = _to_tensors(raw, (1, 8, 8), False, header)
    slow = _to_tensors(raw, (1, 8, 8), False)
    assert torch.equal(fast[0], slow[0]) and fast[1] == slow[1]
    expected = np.load(__import__("io").BytesIO(raw["latent.npy"])).astype(np.float32)
    assert np.array_equal(fast[0].numpy(), expected)
    # Another dtype or shape falls back to the general decoder, and a wrong shape is still reported.
    other = {**raw, "latent.npy": wds.writer.numpy_dumps(np.ones((1, 8, 8), np.float32))}
    assert torch.equal(partial(_to_tensors, latent_shape=(1, 8, 8), with_keys=False, header=header)(other)[0],
                       torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match="latent shape \\(2, 4, 8\\), meta.json says \\(1, 8, 8\\)"):
        _to_tensors({**raw, "latent.npy": wds.writer.numpy_dumps(np.ones((2, 4, 8), np.float16))}, (1, 8, 8),
                    False, header)


def test_a_bad_data_value_is_one_line_from_the_types_of_the_signature(built, capsys):
    """The DataModule's numbers are checked where the CLI types them (PositiveInt, ...), once."""
    from igdit.cli import main

    from helpers import REPO

    for flag, value in (("--data.batch_size", "0"), ("--data.num_workers", "-1"), ("--data.steps_per_epoch", "0")):
        assert main(["fit", "--config", str(REPO / "experiments/default.yaml"), "--data.root", str(built), flag,
                     value]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"error: {flag[2:]}: {value} is not allowed; expected ") and "\n" not in err
