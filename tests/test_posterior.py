"""Posterior shards: the VAE posterior's mean and std stored (float32 by default, float16 when asked; through the
normaliser) and a fresh latent drawn every time training reads a sample — seeded per rank, worker and pass,
reproducible for a fixed seed, new every pass; one fixed draw per sample for validation; the single-draw format
kept for the rest."""
import json
from collections import defaultdict

import numpy as np
import pytest
import torch
import webdataset as wds

from igdit.cli import main as igdit
from igdit.config import ConfigError
from igdit.data import LatentDataModule, build_dataset, build_encoder, bytes_per_sample, images_to_unit, load_source


@pytest.fixture(scope="module")
def posterior_images(tmp_path_factory):
    from conftest import write_image_folder

    images = tmp_path_factory.mktemp("images")
    write_image_folder(images, sizes=[(40, 24), (24, 40), (32, 32), (64, 48), (20, 20), (36, 30)])
    return images


def _build_posterior(tmp_path_factory, images, tiny_vae, **kwargs):
    root = tmp_path_factory.mktemp("posterior") / "shards"
    meta = build_dataset(f"imagefolder:{images}", root, encoder=f"diffusers:{tiny_vae}", resolution=16,
                         latent="posterior", flip=True, val_fraction=0.34, samples_per_shard=4, progress=False, **kwargs)
    return root, images, meta


@pytest.fixture(scope="module")
def posterior_root(tmp_path_factory, posterior_images, tiny_vae):
    """float16 moments: the format every posterior build wrote before float32 became the default."""
    return _build_posterior(tmp_path_factory, posterior_images, tiny_vae, moments_dtype="float16")


@pytest.fixture(scope="module")
def float32_root(tmp_path_factory, posterior_images, tiny_vae):
    """A default (float32) posterior build, and the normalised moments the build computed for each shard, in
    the order it wrote them (recorded from the encoder's output as the build ran)."""
    from igdit.data.shards import _Encoder

    computed = []
    original = _Encoder.posterior

    def recording(self, images):
        mean, std = original(self, images)
        computed.append((mean.clone(), std.clone()))
        return mean, std

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_Encoder, "posterior", recording)
        root, images, meta = _build_posterior(tmp_path_factory, posterior_images, tiny_vae)
    return root, meta, computed


def _raw(root, split="*"):
    urls = sorted(str(p) for p in root.glob(f"{split}-*.tar"))
    return {s["__key__"]: s for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.decode())}


def test_stored_moments_are_the_encoders_posterior_through_the_normaliser(posterior_root, tiny_vae):
    root, images, meta = posterior_root
    assert meta["latent_format"] == "posterior" and meta["members"] == ["mean.npy", "std.npy", "cls"]
    assert meta["encoder"]["latent"] == "posterior" and meta["normalizer"]["scale"] == [0.18215] * 4
    stored = _raw(root)
    assert all(set(s) >= {"mean.npy", "std.npy", "cls"} and "latent.npy" not in s for s in stored.values())
    source = load_source(f"imagefolder:{images}", resolution=16)
    vae = build_encoder(f"diffusers:{tiny_vae}")
    for key, sample in stored.items():
        row, flipped = int(key[:8]), key.endswith("-flip")
        image = source.read(row).flip(-1) if flipped else source.read(row)
        with torch.no_grad():
            dist = vae.vae.encode(images_to_unit(image[None])).latent_dist
        mean, std = sample["mean.npy"], sample["std.npy"]
        assert mean.dtype == std.dtype == np.float16 and mean.shape == (4, 8, 8)
        np.testing.assert_allclose(mean.astype(np.float32), (dist.mean[0] * 0.18215).numpy(), rtol=2e-3, atol=2e-4)
        np.testing.assert_allclose(std.astype(np.float32), (dist.std[0] * 0.18215).numpy(), rtol=2e-3, atol=1e-6)
    assert any(k.endswith("-flip") for k in stored)


def _draws_by_key(stream, n):
    out = defaultdict(list)
    for _ in range(n):
        key, x, _ = next(stream)
        out[key].append(x)
    return out


def test_training_draws_anew_every_pass_and_reproducibly_for_a_fixed_seed(posterior_root):
    root, _, _ = posterior_root
    stored = _raw(root, "train")
    n_train = len(stored)
    dm = LatentDataModule(str(root), shuffle_buffer=8, seed=5)
    first = _draws_by_key(iter(dm.train_samples(with_keys=True)), 40 * n_train)
    again = _draws_by_key(iter(LatentDataModule(str(root), shuffle_buffer=8, seed=5).train_samples(True)), 40 * n_train)
    other = _draws_by_key(iter(LatentDataModule(str(root), shuffle_buffer=8, seed=6).train_samples(True)), n_train)
    assert set(first) == set(stored)
    for key, draws in first.items():
        assert len(draws) == 40  # one read per pass
        assert all(torch.equal(a, b) for a, b in zip(draws, again[key]))  # same seed: the same draws
        assert not any(torch.equal(draws[0], d) for d in draws[1:])  # a new draw every pass
        assert not torch.equal(draws[0], other[key][0])  # another seed: other draws
        # they are draws from the stored posterior: eps = (x - mean) / std is standard normal
        mean, std = (torch.from_numpy(stored[key][m].astype(np.float32)) for m in ("mean.npy", "std.npy"))
        eps = (torch.stack(draws) - mean) / std
        assert abs(eps.mean()) < 0.1 and abs(eps.std() - 1) < 0.1
        assert torch.allclose(torch.stack(draws).mean(0), mean, atol=4 * float(std.max()) / 40 ** 0.5)


def test_each_rank_and_worker_has_its_own_draws(posterior_root, monkeypatch):
    root, _, _ = posterior_root
    dm = LatentDataModule(str(root), shuffle_buffer=8, seed=5)
    stored = _raw(root, "train")
    eps = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("NUM_WORKERS", "2")
    for rank, worker in ((0, 0), (1, 0), (0, 1)):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORKER", str(worker))
        key, x, _ = next(iter(dm.train_samples(with_keys=True)))
        mean, std = (torch.from_numpy(stored[key][m].astype(np.float32)) for m in ("mean.npy", "std.npy"))
        eps[(rank, worker)] = ((x - mean) / std).flatten()[:16]  # the first draw of the first pass
    values = list(eps.values())
    assert all(not torch.allclose(a, b, atol=1e-2) for i, a in enumerate(values) for b in values[i + 1:])


def test_validation_draws_once_per_sample_whatever_the_batching(posterior_root):
    root, _, _ = posterior_root
    dm = LatentDataModule(str(root), batch_size=4, seed=5)
    passes = [{k: x[i] for keys, x, _ in dm.val_dataset(with_keys=True) for i, k in enumerate(keys)} for _ in range(2)]
    assert passes[0].keys() == passes[1].keys() and all(torch.equal(passes[0][k], passes[1][k]) for k in passes[0])
    dm.val_batch_size = 1
    single = {k: x[0] for keys, x, _ in dm.val_dataset(with_keys=True) for k in keys[:1]}
    assert all(torch.equal(single[k], passes[0][k]) for k in single)
    stored = _raw(root, "val")
    key = next(iter(stored))
    assert not torch.equal(passes[0][key], torch.from_numpy(stored[key]["mean.npy"].astype(np.float32)))  # a draw
    x, y = next(iter(dm.val_dataset()))  # without keys: plain (x, y) batches
    assert x.shape == (1, 4, 8, 8) and y.shape == (1,)


def test_real_dataloader_workers_stream_posterior_batches(posterior_root):
    root, _, _ = posterior_root
    dm = LatentDataModule(str(root), batch_size=2, num_workers=2, shuffle_buffer=4, steps_per_epoch=4)
    dm.setup("fit")
    loader = dm.train_dataloader()
    epochs = [torch.cat([x for x, _ in loader]) for _ in range(2)]
    loader._iterator._shutdown_workers()
    assert epochs[0].shape == (8, 4, 8, 8) and not torch.equal(epochs[0], epochs[1])


def test_single_draw_format_stays_for_identity_and_old_shards(digits_root, tmp_path, capsys):
    meta = json.loads((digits_root / "meta.json").read_text())
    assert meta["latent_format"] == "sample"
    with pytest.raises(ConfigError, match=r"^latent: 'posterior' .*only VAE encoders take it"):
        build_dataset("digits", tmp_path / "d", latent="posterior")
    assert not (tmp_path / "d").exists()
    assert igdit(["data", "build", "digits", str(tmp_path / "e"), "--latent", "posterior"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: latent:") and len(err.splitlines()) == 1 and not (tmp_path / "e").exists()
    # a build from before latent_format existed reads as single draws
    old = tmp_path / "old"
    old.mkdir()
    for path in digits_root.glob("*.tar"):
        (old / path.name).symlink_to(path)
    (old / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k not in ("latent_format", "members")}))
    dm = LatentDataModule(str(old))
    assert dm.latent_format == "sample"
    x, y = next(iter(dm.train_samples()))
    assert x.shape == (1, 8, 8)


def test_posterior_shards_take_twice_the_bytes(posterior_root):
    root, _, meta = posterior_root
    assert bytes_per_sample((4, 32, 32), arrays=2) == 2 * bytes_per_sample((4, 32, 32)) - 1024
    tar = root / "train-000000.tar"
    assert tar.stat().st_size <= 10240 + meta["shard_samples"]["train"][0] * bytes_per_sample((4, 8, 8), arrays=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_resumed_from_a_checkpoint_continues_with_the_same_batches_and_draws(posterior_root, digits_root,
                                                                                      workers):
    """What a resumed fit sees: after the state a checkpoint at batch k holds, the data module yields exactly the
    batches an uninterrupted stream yields from batch k on (epoch boundaries, worker interleaving and per-step
    posterior draws included)."""
    for root, batch in ((posterior_root[0], 2), (digits_root, 16)):
        def stream(resume_at=None, count=30):
            dm = LatentDataModule(str(root), batch_size=batch, num_workers=workers, shuffle_buffer=50,
                                  steps_per_epoch=8)
            dm.setup("fit")
            if resume_at is not None:
                dm.load_state_dict({"batches": resume_at})
            batches, loader = [], dm.train_dataloader()
            while len(batches) < count:  # epochs: Lightning iterates the same loader again
                for x, y in loader:
                    batches.append((x, y))
                    if len(batches) == count:
                        break
            return batches

        whole = stream(count=30)
        resumed = stream(resume_at=11, count=19)  # epoch 1, batch 3 of 8
        for (xa, ya), (xb, yb) in zip(whole[11:], resumed):
            assert torch.equal(ya, yb) and torch.equal(xa, xb)


def _decoded_moments(dm, url):
    """(key, mean (c, h, w), std (c, h, w)) of one shard as the DataModule decodes it, before any draw."""
    tar, decode = dm._decode_stages(with_keys=True)[:2]  # the third stage draws from the moments
    return [(key, mean, std) for key, mean, std, _, _ in wds.DataPipeline(wds.SimpleShardList([url]), tar, decode)]


def test_float32_moments_read_back_bit_exact(float32_root):
    from igdit.data.datamodule import npy_header

    root, meta, computed = float32_root
    assert meta["dtype"] == "float32" and json.loads((root / "meta.json").read_text())["dtype"] == "float32"
    dm = LatentDataModule(str(root), seed=5)
    assert dm.dtype == "float32"
    scale = torch.tensor(meta["normalizer"]["scale"]).view(1, -1, 1, 1)
    shift = torch.tensor(meta["normalizer"]["shift"]).view(1, -1, 1, 1)
    urls = dm.train_urls + dm.val_urls  # the order the build wrote them: train shards, then val
    assert len(urls) == len(computed)
    for url, (mean, std) in zip(urls, computed):
        read = _decoded_moments(dm, url)
        assert torch.equal(torch.stack([m for _, m, _ in read]), (mean - shift) * scale)
        assert torch.equal(torch.stack([s for _, _, s in read]), std * scale.abs())
    raw = next(iter(_raw(root, "train").values()))
    assert raw["mean.npy"].dtype == raw["std.npy"].dtype == np.float32
    # the DataModule reads float32 members straight from their bytes (the fast path), not through np.load
    sample = next(iter(wds.DataPipeline(wds.SimpleShardList(dm.train_urls[:1]), wds.tarfile_to_samples())))
    header = npy_header(dm.latent_shape, "float32")
    assert sample["mean.npy"].startswith(header) and len(sample["mean.npy"]) == len(header) + 4 * 4 * 8 * 8
    x, y = next(iter(dm.val_dataset()))  # draws from float32 moments, as from float16 ones
    assert x.dtype == torch.float32 and x.shape[1:] == (4, 8, 8)


def test_float16_moments_read_back_as_before(posterior_root):
    root, _, meta = posterior_root
    assert meta["dtype"] == "float16" and json.loads((root / "meta.json").read_text())["dtype"] == "float16"
    dm = LatentDataModule(str(root), seed=5)
    assert dm.dtype == "float16"
    stored = _raw(root)
    for url in dm.train_urls + dm.val_urls:
        for key, mean, std in _decoded_moments(dm, url):
            assert torch.equal(mean, torch.from_numpy(stored[key]["mean.npy"].astype(np.float32)))
            assert torch.equal(std, torch.from_numpy(stored[key]["std.npy"].astype(np.float32)))
    # a build from before meta.json recorded the dtype reads as float16
    old = root.parent / "old"
    old.mkdir()
    for path in root.glob("*.tar"):
        (old / path.name).symlink_to(path)
    (old / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "dtype"}))
    assert LatentDataModule(str(old)).dtype == "float16"
    meta_other = {**meta, "dtype": "bfloat16"}
    (old / "meta.json").write_text(json.dumps(meta_other))
    with pytest.raises(ConfigError, match=r"^data.root: .* holds 'bfloat16' arrays \(meta.json dtype\)"):
        LatentDataModule(str(old))


def test_float32_moments_take_more_bytes(float32_root):
    root, meta, _ = float32_root
    assert bytes_per_sample((4, 32, 32), arrays=2, dtype="float32") == 35840
    assert bytes_per_sample((4, 32, 32), arrays=2, dtype="float16") == bytes_per_sample((4, 32, 32), arrays=2) == 19456
    tar = root / "train-000000.tar"
    assert tar.stat().st_size <= 10240 + meta["shard_samples"]["train"][0] * bytes_per_sample((4, 8, 8), 2, "float32")
    assert tar.stat().st_size > 10240 + meta["shard_samples"]["train"][0] * bytes_per_sample((4, 8, 8), 2, "float16")
    # --shard_size_mb counts float32 samples: fewer fit in the same size
    from igdit.data.shards import _resolve_samples_per_shard

    sizes = {d: _resolve_samples_per_shard(None, 1.0, (4, 32, 32), False, 2, d) for d in ("float16", "float32")}
    assert sizes == {"float16": 2**20 // 19456, "float32": 2**20 // 35840}


def test_a_bad_moments_dtype_is_one_line(tmp_path, capsys, tiny_vae):
    assert igdit(["data", "build", "digits", str(tmp_path / "a"), "--moments_dtype", "float64"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: moments_dtype: float64 is not allowed;")
    assert "float16" in err and "float32" in err and not (tmp_path / "a").exists()
    with pytest.raises(ConfigError, match=r"^moments_dtype: 'bfloat16' is not allowed; choose one of 'float16', 'float32'$"):
        build_dataset("digits", tmp_path / "b", moments_dtype="bfloat16")
    # only posterior shards store moments: the single-draw latent.npy stays float16
    assert igdit(["data", "build", "digits", str(tmp_path / "c"), "--moments_dtype", "float32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: moments_dtype: 'float32' is not allowed; only posterior")
    assert not any((tmp_path / name).exists() for name in ("b", "c"))


def test_an_unfinished_build_from_before_the_choice_resumes_as_float16(posterior_root, tmp_path):
    """Its plan has no moments_dtype and its finished shards hold float16 moments: the default (float32) would mix
    dtypes in one folder, so only --moments_dtype float16 resumes it."""
    import shutil

    root, images, meta = posterior_root
    unfinished = tmp_path / "unfinished"
    shutil.copytree(root, unfinished)
    (unfinished / "meta.json").unlink()
    (unfinished / "val-000000.tar").unlink()
    plan_path = unfinished / ".build" / "plan.json"
    plan = json.loads(plan_path.read_text())
    assert plan["args"].pop("moments_dtype") == "float16"
    plan_path.write_text(json.dumps(plan))
    args = dict(encoder=meta["encoder"]["name"], resolution=16, latent="posterior", flip=True, val_fraction=0.34,
                samples_per_shard=4, progress=False, resume=True)
    with pytest.raises(ConfigError, match=r"^moments_dtype: 'float32' is not allowed; the unfinished build .* used 'float16'"):
        build_dataset(f"imagefolder:{images}", unfinished, **args)
    resumed = build_dataset(f"imagefolder:{images}", unfinished, moments_dtype="float16", **args)
    assert resumed["dtype"] == "float16" and resumed["shard_sha256"] == meta["shard_sha256"]


def test_the_rounding_measurement_behind_the_float32_default():
    from igdit.bench.core import moments_rounding_error, moments_section

    result = moments_rounding_error(stds=(1e-3, 1e-2))
    rows = result["rows"]
    assert {r["dtype"] for r in rows} == {"float16", "float32"} and len({r["latents"] for r in rows}) == 2
    assert all(r["max"] == r["mean"] == r["std_rel"] == 0 for r in rows if r["dtype"] == "float32")
    for r in (r for r in rows if r["dtype"] == "float16"):
        assert 0 < r["mean"] <= r["max"] <= 2**-11 * r["abs_max"] / r["std"]  # round to nearest: half an ulp
        assert r["max"] == pytest.approx(r["error_max"] / r["std"])
    continuous = [r for r in rows if r["dtype"] == "float16" and r["latents"].startswith("digits 32x32")]
    assert max(r["max"] for r in continuous if r["std"] == 1e-3) > 0.5  # float16 is not negligible at small stds
    lines = moments_section(result)
    assert lines[0] == "## Posterior moments: float16 vs float32\n" and any("| 0.001 |" in line for line in lines)
