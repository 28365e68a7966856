"""Fréchet distance: the feature networks, reference statistics, the evaluator, DDP, the callback and `igdit eval`."""
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.multiprocessing as mp

from igdit.config import ConfigError
from igdit.data import LatentDataModule
from igdit.metrics import FrechetEvaluator, ReferenceStats, frechet_distance, real_image_batches
from igdit.metrics.evaluate import data_fingerprint, reference_dir
from igdit.metrics.features import INCEPTION_WEIGHTS_FILE, InceptionFeatures, digits_feature_net, load_digits_feature_net
from igdit.metrics.fid import load_reference, new_frechet_metric, reference_from_metric
from helpers import free_port, tiny_module


def _evaluator(root, feature="digits"):
    return FrechetEvaluator(feature, LatentDataModule(root=str(root)))


@pytest.fixture(scope="session")
def digits_net(digits_root):
    return _evaluator(digits_root).net


def _images(root, split="train"):
    return torch.cat(list(real_image_batches(LatentDataModule(root=str(root)), split, 500)))


def _noisy(images, std, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=g)
    return (images.float() + std * noise).round().clamp(0, 255).to(torch.uint8)


def _fd_reference(mu1, s1, mu2, s2):
    """The Fréchet distance written out directly (ADM / pytorch-fid formula, scipy's sqrtm)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ---- the digits feature network ----------------------------------------------------------------------
def test_the_digits_feature_net_is_trained_on_first_use_cached_by_the_shards_and_knows_digits(digits_root, tmp_path):
    datamodule = LatentDataModule(root=str(digits_root))
    cache = tmp_path / "cache"
    net = digits_feature_net(datamodule, cache, data_fingerprint(datamodule))
    (saved,) = cache.glob("fd_digits-*.pt")
    assert saved.name == f"fd_digits-{data_fingerprint(datamodule)[:12]}.pt"
    before = saved.stat().st_mtime_ns
    again = digits_feature_net(datamodule, cache, data_fingerprint(datamodule))
    assert saved.stat().st_mtime_ns == before  # read back, not trained again
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    loaded, info = load_digits_feature_net(saved)
    assert info["val_accuracy"] >= 0.95 and net.num_features == 64  # a feature space that knows digits
    val = _images(digits_root, "val")
    labels = torch.cat([y for _, y in LatentDataModule(root=str(digits_root)).latent_batches("val", 500)])
    accuracy = (net.logits(val).argmax(1) == labels).float().mean().item()
    assert accuracy == pytest.approx(info["val_accuracy"], abs=1e-4)
    assert data_fingerprint(datamodule) != data_fingerprint(datamodule, "val")  # keyed by what was read
    assert net(val).shape == (len(val), 64)
    assert torch.equal(net(val), net(val.expand(-1, 3, -1, -1)))  # ADM files hold grey as 3 equal channels


# ---- the distance itself -----------------------------------------------------------------------------
def test_fd_of_real_data_against_itself_is_zero(digits_root, digits_net):
    net = digits_net
    train = _images(digits_root)
    assert frechet_distance(net, [train], [train], "digits") == pytest.approx(0.0, abs=1e-3)


def test_fd_of_noise_against_real_data_is_large_and_grows_with_the_noise(digits_root, digits_net):
    net = digits_net
    train, val = _images(digits_root), _images(digits_root, "val")
    stats = reference_from_metric(_streamed(net, train), "digits")
    distances = [frechet_distance(net, stats, [_noisy(val, std)], "digits") for std in (0, 8, 24, 48, 96)]
    assert all(a < b for a, b in zip(distances, distances[1:])), distances
    noise = torch.randint(0, 256, val.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    pure_noise = frechet_distance(net, stats, [noise], "digits")
    assert pure_noise > 20 * distances[0] and pure_noise > distances[-1]


def _streamed(net, images):
    metric = new_frechet_metric(net)
    metric.update(images, real=True)
    return metric


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # dead ReLU features: singular covariances
def test_fd_from_loaded_statistics_matches_the_direct_formula(digits_root, digits_net):
    net = digits_net
    train, val = _images(digits_root), _images(digits_root, "val")
    with torch.no_grad():
        real, fake = net(train).double().numpy(), net(_noisy(val, 20)).double().numpy()
    stats = ReferenceStats(n=len(real), mu=real.mean(0), sigma=np.cov(real, rowvar=False), feature="digits")
    expected = _fd_reference(stats.mu, stats.sigma, fake.mean(0), np.cov(fake, rowvar=False))
    assert frechet_distance(net, stats, [_noisy(val, 20)], "digits") == pytest.approx(expected, rel=1e-4)
    assert frechet_distance(net, [train], [_noisy(val, 20)], "digits") == pytest.approx(expected, rel=1e-4)
    # The sums torchmetrics keeps give back exactly these statistics.
    metric = new_frechet_metric(net)
    load_reference(metric, stats)
    back = reference_from_metric(metric, "digits")
    np.testing.assert_allclose(back.mu, stats.mu, atol=1e-10)
    np.testing.assert_allclose(back.sigma, stats.sigma, atol=1e-9)


def test_reference_statistics_file_round_trips_and_is_checked(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 8))
    stats = ReferenceStats(n=200, mu=features.mean(0), sigma=np.cov(features, rowvar=False), feature="digits")
    path = stats.save(tmp_path / "ref.npz")
    back = ReferenceStats.load(path, 8, "digits")
    assert back.n == 200 and back.feature == "digits"
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    with pytest.raises(FileExistsError):  # never replaces a reference file
        stats.save(path)
    with pytest.raises(ConfigError, match=r"mu \(8,\) and sigma \(8, 8\).*need mu \(64,\)"):
        ReferenceStats.load(path, 64, "digits")
    with pytest.raises(ConfigError, match="'digits' features, not 'inception'"):
        ReferenceStats.load(path, 8, "inception")
    np.savez(tmp_path / "adm.npz", mu=stats.mu, sigma=stats.sigma)  # the ADM suite's files: no n, no name
    assert ReferenceStats.load(tmp_path / "adm.npz", 8, "inception").n == 50_000
    with pytest.raises(ConfigError, match="reference"):
        ReferenceStats.load(tmp_path / "missing.npz", 8, "digits")


def test_too_few_samples_for_the_feature_dimension_warns():
    from igdit.metrics.fid import warn_if_singular

    with pytest.warns(UserWarning, match="covariance is singular"):
        warn_if_singular(50, 64, "FIDCallback.num_samples")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_singular(500, 64, "FIDCallback.num_samples")


# ---- the evaluator and its cached reference ----------------------------------------------------------
def test_reference_is_computed_once_then_read_from_the_cache(digits_root):
    datamodule = LatentDataModule(root=str(digits_root))
    first = _evaluator(digits_root)
    stats = first.reference_from_data(datamodule, "val", batch_size=64)
    cached = sorted((digits_root / "fid_refs").glob("digits-val-all-*.npz"))
    assert len(cached) == 1 and stats.n == 180
    before = cached[0].stat().st_mtime_ns
    second = _evaluator(digits_root)
    again = second.reference_from_data(datamodule, "val", batch_size=7)
    assert cached[0].stat().st_mtime_ns == before  # read, not rewritten
    np.testing.assert_allclose(again.sigma, stats.sigma)
    val = _images(digits_root, "val")
    assert second.score(val.split(50))["fd"] == pytest.approx(0.0, abs=1e-3)
    capped = _evaluator(digits_root).reference_from_data(datamodule, "train", 64, max_samples=300)
    assert capped.n == 300


def _ddp_worker(rank, world, port, root, fake, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        evaluator = _evaluator(root)
        evaluator.reference_from_data(LatentDataModule(root=root), "train", batch_size=64, cache=False)
        result = evaluator.score(fake[rank::world].split(32))
        torch.save({"result": result, "n": evaluator.reference.n}, f"{out}-{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_gives_the_same_fd_as_one_process(digits_root, tmp_path):
    fake = _noisy(_images(digits_root, "val"), 30)
    single = _evaluator(digits_root)
    single.reference_from_data(LatentDataModule(root=str(digits_root)), "train", batch_size=64, cache=False)
    expected = single.score(fake.split(50))
    mp.spawn(_ddp_worker, args=(2, free_port(), str(digits_root), fake, str(tmp_path / "r")), nprocs=2)
    for rank in range(2):
        saved = torch.load(tmp_path / f"r-{rank}.pt")
        assert saved["n"] == 1617  # the ranks read disjoint halves of the shards; the sums add up to all of them
        assert saved["result"]["num_samples"] == len(fake)
        assert saved["result"]["fd"] == pytest.approx(expected["fd"], rel=1e-5)


# ---- Inception: the real class with random weights (no download here) -------------------------------
def test_missing_inception_weights_say_where_they_were_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ConfigError) as err:
        InceptionFeatures()
    message = str(err.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE) in message
    assert "download" in message and "\n" not in message
    with pytest.raises(ConfigError, match="nowhere.pth"):
        InceptionFeatures(str(tmp_path / "nowhere.pth"))


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A state dict of torch-fidelity's Inception class with random weights, as a weights file."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"), \
            mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", return_value={}):
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.slow
def test_inception_features_and_score_run_through_the_real_class(random_inception_weights):
    evaluator = FrechetEvaluator("inception", inception_weights=str(random_inception_weights))
    assert evaluator.metric_name == "fid" and evaluator.num_features == 2048
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (6, 1, 8, 8), generator=g, dtype=torch.uint8)  # grey digits: repeated to RGB
    fake = torch.randint(0, 256, (6, 3, 8, 8), generator=g, dtype=torch.uint8)
    evaluator.stream_reference([real])
    result = evaluator.score([fake[:3], fake[3:]])
    assert result["num_samples"] == 6 and np.isfinite(result["fd"]) and result["fd"] > 0
    assert 1.0 <= result["is"] <= 1008  # IS lies between 1 and the number of classes
    same = evaluator.score([real])
    assert same["fd"] < 1e-3 * result["fd"]


# ---- settings and the callback's checks --------------------------------------------------------------
@pytest.mark.parametrize("settings,field", [
    ({"ig+cfg": {}}, "settings"),
    ({"ig": {"ig": {"scale": -1}}}, "settings.ig.ig.scale"),
    ({"ig": {"ig": {"interval": [0.8, 0.2]}}}, "settings.ig.ig.interval"),
    ({"ig": {"autoguide": {}}}, "settings.ig.autoguide"),
    ({"ig": {"ig": {"weight": 2}}}, "settings.ig.ig.weight"),
    ({}, "settings"),
])
def test_bad_guidance_settings_are_one_line_errors(settings, field):
    from igdit.callbacks import FIDCallback

    with pytest.raises(ConfigError) as err:
        FIDCallback(settings=settings, feature="digits")
    assert str(err.value).startswith(f"FIDCallback.{field}:") and "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs,field", [
    ({"num_samples": 1}, "num_samples"), ({"sampler": "ddim"}, "sampler"), ({"feature": "clip"}, "feature"),
    ({"reference": "test"}, "reference"), ({"labels": "sorted"}, "labels"), ({"every_n_steps": 0}, "every_n_steps"),
    ({"sampler": "sde", "steps": 1}, "steps"),
])
def test_bad_callback_values_are_one_line_errors(kwargs, field):
    from igdit.callbacks import FIDCallback
    from igdit.config import instantiate

    with pytest.raises(ConfigError, match=f"^FIDCallback.{field}:"):  # as the YAML is parsed
        instantiate(FIDCallback, {"class_path": "igdit.callbacks.FIDCallback", "init_args": kwargs}, "FIDCallback")


# ---- `igdit eval --npz` ------------------------------------------------------------------------------
def test_eval_scores_an_adm_npz_against_a_data_folder(digits_root, tmp_path, capsys):
    from igdit.cli import main

    val = _images(digits_root, "val")
    npz = tmp_path / "samples.npz"
    np.savez(npz, arr_0=val.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy())  # what `igdit sample` writes
    assert main(["eval", "--npz", str(npz), "--ref", str(digits_root), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fd_digits ") and "180 samples" in out
    assert float(out.split()[1]) == pytest.approx(0.0, abs=1e-3)
    assert main(["eval", "--npz", str(npz), "--ref", str(digits_root)]) == 0
    against_train = float(capsys.readouterr().out.split()[1])
    assert 0.01 < against_train < 20  # a held-out sample of the same data: close, not identical

    stats = _evaluator(digits_root).reference_from_data(LatentDataModule(root=str(digits_root)),
                                                                             "train", cache=False)
    ref = stats.save(tmp_path / "train_stats.npz")
    assert main(["eval", "--npz", str(npz), "--ref", str(ref), "--feature", "digits"]) == 2
    assert "needs the data folder" in capsys.readouterr().err  # the digits network lives beside the shards


def test_eval_refuses_a_reference_of_other_images_than_the_samples(digits_root, tmp_path, capsys):
    """RGB noise scored against the digits printed a plausible fd_digits 0.65."""
    from igdit.cli import main

    rng = np.random.default_rng(0)
    val = _images(digits_root, "val").expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
    cases = {
        "colour.npz": ({"arr_0": rng.integers(0, 256, (180, 8, 8, 3), dtype=np.uint8)}, "holds grey (1-channel) images"),
        "size.npz": ({"arr_0": np.repeat(np.repeat(val, 4, 1), 4, 2)}, "holds 8x8 images and"),
        "source.npz": ({"arr_0": val, "source": np.str_("imagefolder:/data/cats")}, "was built from 'digits'"),
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / name, **arrays)
        assert main(["eval", "--npz", str(tmp_path / name), "--ref", str(digits_root)]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --ref: ") and message in err[0], (name, err)
    np.savez(tmp_path / "same.npz", arr_0=val, source=np.str_("digits"))  # what `igdit sample` writes for digits
    assert main(["eval", "--npz", str(tmp_path / "same.npz"), "--ref", str(digits_root), "--split", "val"]) == 0


def test_eval_names_ref_when_its_folder_holds_no_finished_build(digits_root, tmp_path, capsys):
    """An empty (or unfinished) build passed as --ref was reported as a bad data.root, an option eval has not."""
    from igdit.cli import main

    npz = tmp_path / "samples.npz"
    np.savez(npz, arr_0=_images(digits_root, "val").expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy())
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--npz", str(npz), "--ref", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --ref: '{tmp_path / 'empty'}' is not allowed; has no meta.json") and "\n" not in err


@pytest.mark.parametrize("content,message", [("not an npz", "could not be read"), (None, "is not a file")])
def test_eval_refuses_a_bad_sample_file_with_one_line(content, message, digits_root, tmp_path, capsys):
    from igdit.cli import main

    npz = tmp_path / "bad.npz"
    if content is not None:
        npz.write_text(content)
    assert main(["eval", "--npz", str(npz), "--ref", str(digits_root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --npz") and message in err and "\n" not in err


def test_the_callback_scores_whichever_module_holds_the_ema_weights():
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import EMAWeightAveraging

    from igdit.callbacks import FIDCallback

    fid, ema = FIDCallback(feature="digits"), EMAWeightAveraging()
    averaged = SimpleNamespace(data_meta=None)
    ema._average_model = SimpleNamespace(module=averaged)
    module = SimpleNamespace(data_meta={"encoder": {"name": "identity"}})
    fitting = SimpleNamespace(fn="fit")
    # EMA listed first: its on_validation_epoch_end has swapped the raw weights back -> the averaged copy.
    scored, weights = fid._scored_module(SimpleNamespace(callbacks=[ema, fid], state=fitting), module)
    assert scored is averaged and weights == "ema" and averaged.data_meta is module.data_meta
    # FIDCallback first: the module still holds the EMA weights.
    scored, weights = fid._scored_module(SimpleNamespace(callbacks=[fid, ema], state=fitting), module)
    assert scored is module and weights == "ema"
    scored, weights = fid._scored_module(SimpleNamespace(callbacks=[fid], state=fitting), module)
    assert weights == "raw"
    scored, weights = fid._scored_module(SimpleNamespace(callbacks=[ema, fid], state=SimpleNamespace(fn="validate")),
                                         module)
    assert scored is module and weights == "checkpoint"


def _setup(callback, root, exits=(2,), checkpoints=(), val_check_interval=500):
    from types import SimpleNamespace

    module = tiny_module(backbone={"exits": list(exits)}, terms=None)
    trainer = SimpleNamespace(checkpoint_callbacks=list(checkpoints), datamodule=LatentDataModule(root=str(root)),
                              strategy=SimpleNamespace(root_device=torch.device("cpu")), logger=None,
                              val_check_interval=val_check_interval)
    callback.setup(trainer, module, "fit")
    return callback


@pytest.mark.parametrize("kwargs,exits,monitor,field", [
    ({"settings": {"ig": {"ig": {"scale": 2.0}}}}, (), None, "FIDCallback.settings.ig.ig.scale"),
    ({"num_samples": 105}, (2,), None, "FIDCallback.num_samples"),
    ({"settings": {"none": {}, "ig": {"ig": {"scale": 2.0}}}}, (2,), "fd_digits/ig_cfg", "ModelCheckpoint.monitor"),
    ({}, (2,), "fid/none", "ModelCheckpoint.monitor"),
    ({"every_n_steps": 1000}, (2,), "fd_digits/none", "FIDCallback.every_n_steps"),  # validation every 500
])
def test_callback_checks_settings_and_monitors_before_any_compute(kwargs, exits, monitor, field, digits_root):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from igdit.callbacks import FIDCallback

    checkpoints = [ModelCheckpoint(monitor=monitor)] if monitor else []
    if field == "FIDCallback.every_n_steps":  # evaluating in every validation pass is fine
        _setup(FIDCallback(feature="digits", every_n_steps=500), digits_root, exits, checkpoints)
    with pytest.raises(ConfigError) as err:
        _setup(FIDCallback(feature="digits", **kwargs), digits_root, exits, checkpoints)
    assert str(err.value).startswith(field + ":") and "\n" not in str(err.value)
    if field == "ModelCheckpoint.monitor":
        assert "fd_digits/none" in str(err.value)  # names what the callback does log


def test_callback_setup_warns_for_a_small_k_and_checks_the_reference_file(digits_root, tmp_path, monkeypatch):
    from igdit.callbacks import FIDCallback

    with pytest.warns(UserWarning, match="covariance is singular"):
        callback = _setup(FIDCallback(feature="digits", num_samples=50), digits_root)
    assert callback.evaluator.reference.n == 1617
    np.savez(tmp_path / "wrong.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ConfigError, match=r"^FIDCallback.reference: .*need mu \(64,\)"):
        _setup(FIDCallback(feature="digits", reference=str(tmp_path / "wrong.npz")), digits_root)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ConfigError, match="^FIDCallback.inception_weights: .*looked in"):
        _setup(FIDCallback(feature="inception"), digits_root)
