"""`igdit data build` at scale: SD-VAE-style encoders through diffusers, flips, shard sizes, resume, ranks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from helpers import free_port
from igdit.data.encoders import decode_latents
from igdit.config import ConfigError
from igdit.data import (LatentDataModule, LatentNormalizer, build_dataset, build_encoder, bytes_per_sample,
                        images_to_unit, load_meta, load_source)
from igdit.cli import main as igdit
from igdit.data.encoders import IdentityEncoder

REPO = Path(__file__).resolve().parents[1]


def data_main(argv):
    return igdit(["data", *argv])


def _samples(root, split="*"):
    """{key: (latent as stored, label)} of every sample of the split(s), from disk."""
    urls = sorted(str(p) for p in Path(root).glob(f"{split}-*.tar"))
    out = {}
    for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.decode()):
        assert s["__key__"] not in out, f"duplicate key {s['__key__']}"
        out[s["__key__"]] = (s["latent.npy"], s["cls"])
    return out


# ---- diffusers AutoencoderKL -------------------------------------------------------------------------------
def test_vae_round_trip_encode_shard_stream_decode_reproduces_the_images(image_folder, tiny_vae, tmp_path):
    out = tmp_path / "vae16"
    meta = build_dataset(f"imagefolder:{image_folder}", out, encoder=f"diffusers:{tiny_vae}", resolution=16,
                         latent="mean", val_fraction=0.3, samples_per_shard=4, progress=False)
    assert meta["latent_shape"] == [4, 8, 8] and meta["image_shape"] == [3, 16, 16]
    assert meta["encoder"]["name"] == f"diffusers:{tiny_vae}" and meta["encoder"]["latent"] == "mean"
    assert meta["normalizer"] == {"shift": [0.0] * 4, "scale": [0.18215] * 4}  # SD's constant, from the config

    source = load_source(f"imagefolder:{image_folder}", resolution=16)
    dm = LatentDataModule(str(out), batch_size=4)
    streamed = {}
    for urls in (dm.train_urls, dm.val_urls):
        dm.val_urls = urls  # the validation pipeline reads every shard once, in order
        for keys, x, y in dm.val_dataset(with_keys=True):
            streamed.update({k: (x[i], int(y[i])) for i, k in enumerate(keys)})
    assert sorted(streamed) == [f"{r:08d}" for r in range(15)]

    vae = build_encoder(f"diffusers:{tiny_vae}", latent="mean")
    images = images_to_unit(torch.stack([source.read(r) for r in range(15)]))
    with torch.no_grad():
        reference = vae.vae.decode(vae.vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    x = torch.stack([streamed[f"{r:08d}"][0] for r in range(15)])
    decoded = decode_latents(x, meta)  # what sampling and the FID callback call: the encoder rebuilt from meta.json
    assert [streamed[f"{r:08d}"][1] for r in range(15)] == source.labels.tolist()
    assert (decoded - reference).abs().max() < 2e-3  # float16 storage is all the pipeline adds
    vae_error = (reference - images).abs().mean()
    assert abs((decoded - images).abs().mean() - vae_error) < 1e-3 * (1 + vae_error)


def test_posterior_samples_are_seeded_per_image_and_recorded(tiny_vae):
    vae = build_encoder(f"diffusers:{tiny_vae}")
    assert vae.latent == "sample" and vae.describe()["latent"] == "sample"
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    together = vae.encode(x, seeds=[7, 8, 9])
    alone = vae.encode(x[1:2], seeds=[8])
    torch.testing.assert_close(together[1:2], alone, rtol=1e-5, atol=1e-5)  # the batch does not matter
    mean = build_encoder(f"diffusers:{tiny_vae}", latent="mean").encode(x)
    dist = vae.vae.encode(x).latent_dist
    noise = (together - mean) / dist.std
    assert 0.8 < noise.std() < 1.2 and noise.mean().abs() < 0.15  # z = mean + std * eps, eps ~ N(0, 1)
    assert not torch.allclose(vae.encode(x, seeds=[1, 2, 3]), together)


def test_encoder_is_rebuilt_from_its_meta_description(tiny_vae, tmp_path):
    copy = tmp_path / "weights"
    build_encoder(f"diffusers:{tiny_vae}").vae.save_pretrained(copy)
    named = build_encoder("sd-vae-ft-ema", path=str(copy))  # a named VAE read from a local folder
    description = json.loads(json.dumps(named.describe()))
    assert description["name"] == "sd-vae-ft-ema" and description["hub_id"] == "stabilityai/sd-vae-ft-ema"
    assert description["path"] == str(copy) and description["loaded_from"] == str(copy)
    rebuilt = build_encoder(description)
    z = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(rebuilt.decode(z), named.decode(z))
    assert rebuilt.latent_shape((3, 256, 256)) == (4, 128, 128)  # this tiny VAE downsamples by 2


@pytest.mark.parametrize("encoder,extra,where", [
    ("sd-vae-ft-ema", [], "the Hugging Face cache .*hub \\(for stabilityai/sd-vae-ft-ema\\)"),
    ("sd-vae-ft-mse", ["--vae_path", "/no/such/folder"],
     "the folder /no/such/folder \\(no such folder\\); then the Hugging Face cache .*stabilityai/sd-vae-ft-mse"),
    ("diffusers:/no/vae/here", [], "the folder /no/vae/here"),
])
def test_a_vae_that_cannot_be_loaded_says_where_weights_were_looked_for(encoder, extra, where, tmp_path, capsys,
                                                                       monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: the code itself passes local_files_only
    out = tmp_path / "out"
    assert data_main(["build", "digits", str(out), "--encoder", encoder, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"error: encoder: '{encoder}' is not allowed; no loadable AutoencoderKL weights; looked in ")
    import re
    assert re.search(where, err), err
    assert not out.exists()


def test_unknown_encoder_and_vae_options_on_identity_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="^encoder: 'sd-vae' .*'identity', 'sd-vae-ft-ema', 'sd-vae-ft-mse', "
                                          "'diffusers:<folder or hub id>'"):
        build_dataset("digits", tmp_path / "a", encoder="sd-vae")
    with pytest.raises(ConfigError, match="^vae_path: '/x' .*only VAE encoders take it"):
        build_dataset("digits", tmp_path / "a", vae_path="/x")
    with pytest.raises(ConfigError, match="^latent: 'mode' .*choose one of 'sample', 'mean'"):
        build_encoder("sd-vae-ft-ema", latent="mode")
    assert not (tmp_path / "a").exists()


# ---- normaliser, flips, shard size ------------------------------------------------------------------------
def test_channel_statistics_normalise_the_training_latents_to_unit_scale(tmp_path):
    out = tmp_path / "stats"
    meta = build_dataset("digits", out, normalizer="channel-stats", progress=False)
    assert meta["normalizer_fit"]["method"] == "channel-stats" and meta["normalizer_fit"]["images"] == 1617
    train = np.stack([latent for latent, _ in _samples(out, "train").values()]).astype(np.float64)
    assert abs(train.mean()) < 1e-3 and abs(train.std() - 1) < 1e-3
    norm = LatentNormalizer.from_dict(meta["normalizer"])  # and it inverts back to the pixels
    pixels = IdentityEncoder().decode(norm.denormalize(torch.from_numpy(train[:4]).float()))
    assert pixels.min() >= -1.001 and pixels.max() <= 1.001


def test_flip_writes_a_mirrored_copy_of_each_training_image_next_to_it(tmp_path, capsys):
    out = tmp_path / "flip"
    assert data_main(["build", "digits", str(out), "--flip", "--samples_per_shard", "200", "--no_progress"]) == 0
    assert "training images also mirrored" in capsys.readouterr().out
    meta = load_meta(out)
    train, val = _samples(out, "train"), _samples(out, "val")
    assert meta["flip"] is True and meta["num_samples"] == {"train": 2 * 1617, "val": 180}
    assert meta["num_images"] == {"train": 1617, "val": 180}
    assert not any(k.endswith("-flip") for k in val)
    for key in [k for k in train if not k.endswith("-flip")]:
        image, label = train[key]
        mirrored, mirrored_label = train[key + "-flip"]
        assert np.array_equal(mirrored, image[..., ::-1]) and label == mirrored_label
    first = [s["__key__"] for s in wds.DataPipeline(wds.SimpleShardList([str(out / "train-000000.tar")]),
                                                   wds.tarfile_to_samples())]
    assert len(first) == 200 and first[1] == first[0] + "-flip"
    with pytest.raises(ConfigError, match="^samples_per_shard: 99 .*--flip.*even"):
        build_dataset("digits", tmp_path / "odd", flip=True, samples_per_shard=99)


def test_shard_size_in_mib_sets_samples_per_shard_from_the_bytes_a_sample_takes(tmp_path):
    assert bytes_per_sample((4, 32, 32)) == 10240  # SD-VAE latents: 1 GiB holds 104,857 of them
    assert bytes_per_sample((1, 8, 8)) == 2048
    out = tmp_path / "mib"
    meta = build_dataset("digits", out, shard_size_mb=0.1, progress=False)
    assert meta["samples_per_shard"] == int(0.1 * 2**20) // 2048 == 51
    sizes = [p.stat().st_size for p in sorted(out.glob("train-*.tar"))[:-1]]
    assert all(0.9 * 0.1 * 2**20 < s <= 0.1 * 2**20 + 10240 for s in sizes)  # + tar's end-of-archive record
    with pytest.raises(ConfigError, match="^shard_size_mb: .*not both"):
        build_dataset("digits", tmp_path / "both", shard_size_mb=1, samples_per_shard=10)


# ---- resume ------------------------------------------------------------------------------------------------
class Interrupted(Exception):
    pass


def test_resumed_build_keeps_finished_shards_redoes_the_partial_one_and_equals_an_uninterrupted_build(
        digits_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "resumed"
    calls = {"n": 0}
    original = IdentityEncoder.encode

    def encode_then_fail(self, images, seeds=None):
        calls["n"] += 1
        if calls["n"] == 8:  # the 8th shard: 7 are finished, the 8th is open as .tar.tmp
            (out / "train-000007.tar.tmp").write_bytes(b"half a tar")
            raise Interrupted
        return original(self, images, seeds)

    monkeypatch.setattr(IdentityEncoder, "encode", encode_then_fail)
    with pytest.raises(Interrupted):
        build_dataset("digits", out, progress=False, batch_size=100)  # one encoder call per shard
    monkeypatch.setattr(IdentityEncoder, "encode", original)
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert sorted(finished) == [f"train-{i:06d}.tar" for i in range(7)] and not (out / "meta.json").exists()

    # Not resumable by accident: a plain build, other arguments, or reading it for training are refused.
    assert data_main(["build", "digits", str(out)]) == 2
    assert "holds 7 finished shard(s) of an unfinished build; pass --resume" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="^samples_per_shard: 50 .*used 100; resume it with the same arguments"):
        build_dataset("digits", out, samples_per_shard=50, resume=True, progress=False)
    with pytest.raises(ConfigError, match="^data.root: .*unfinished build.*--resume"):
        LatentDataModule(str(out))

    assert data_main(["build", "digits", str(out), "--resume", "--no_progress"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("train-00000[0-6].tar")} == finished  # kept as they were
    assert not list(out.glob("*.tmp"))
    resumed, uninterrupted = _samples(out), _samples(digits_root)  # _samples fails on a duplicate key
    assert sorted(resumed) == sorted(uninterrupted)
    assert all(np.array_equal(resumed[k][0], uninterrupted[k][0]) and resumed[k][1] == uninterrupted[k][1]
               for k in resumed)
    meta, reference = load_meta(out), load_meta(digits_root)
    assert meta["num_samples"] == reference["num_samples"] and meta["shard_samples"] == reference["shard_samples"]
    assert data_main(["build", "digits", str(out), "--resume"]) == 2  # a finished build is never touched again
    assert "already holds a finished build" in capsys.readouterr().err


# ---- several ranks -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_ranks_under_torchrun_write_the_same_shards_as_one_process(digits_root, tmp_path):
    out = tmp_path / "two-ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "igdit.cli", "data", "build", "digits", str(out), "--no_progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("built digits") == 1  # rank 0 reports
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(p.name for p in digits_root.glob("*.tar"))
    two, one = _samples(out), _samples(digits_root)
    assert sorted(two) == sorted(one) and all(np.array_equal(two[k][0], one[k][0]) for k in one)
    assert load_meta(out)["shard_samples"] == load_meta(digits_root)["shard_samples"]


@pytest.mark.parametrize("flags,error", [
    (["--normalizer", "minmax"], "error: normalizer: 'minmax' is not allowed; choose one of 'encoder', 'channel-stats'"),
    (["--encoder", "sd-vae-ft-ema", "--latent", "mode"], "error: latent: 'mode' is not allowed; choose one of 'sample'"),
    (["--latent", "mean"], "error: latent: 'mean' is not allowed; only VAE encoders take it"),
    (["--stats_images", "1"], "error: stats_images: 1 is not allowed; expected an integer >= 2"),
    (["--workers", "-1"], "error: workers: -1 is not allowed; expected NonNegativeInt (v>=0)"),
    (["--batch_size", "0"], "error: batch_size: 0 is not allowed; expected PositiveInt (v>0)"),
    (["--shard_size_mb", "0"], "error: shard_size_mb: 0 is not allowed; expected PositiveFloat (v>0)"),
    (["--samples_per_shard", "0"], "error: samples_per_shard: 0 is not allowed; expected PositiveInt (v>0)"),
    (["--device", "gpu7"], "error: device: 'gpu7' is not allowed; expected cpu, cuda or cuda:<index>"),
    (["--device", "cuda:9"], "error: device: 'cuda:9' is not allowed; expected cpu, cuda or cuda:<index> of a visible"),
])
def test_bad_build_flags_stop_with_one_line_before_anything_is_written(flags, error, tmp_path, capsys):
    out = tmp_path / "out"
    assert data_main(["build", "digits", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(error) and "\n" not in err, err
    assert not out.exists()
