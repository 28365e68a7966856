"""`igdit import-ckpt` for both official formats, end to end: tiny random models in the official layouts (a
LightningDiT+IG training checkpoint with its yaml config, a bare `module.`-prefixed state dict, a SiT+IG one),
imported with real VAE classes at tiny random weights (VA-VAE as an LDM checkpoint, SD-VAE-like diffusers
folder), sampled through `igdit sample` to PNG and .npz; and every bad input as one line with nothing written."""
import argparse

import numpy as np
import pytest
import torch

from igdit.checkpoints import load_module
from igdit.cli import main as igdit
from igdit.data import decode_latents
from igdit.data.encoders import load_latent_stats
from igdit.models import LightningDiT, build_backbone
from ldm_vae_reference import ldm_state_dict

# LightningDiT-T/1 (depth 6, width 128, 4 heads; a registered test size) on VA-VAE f16d32 latents of 32 px images
LDIT = dict(input_size=2, in_channels=32, num_classes=10)


def _random(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * 0.05 if not k.startswith("feat_rope") else v.clone())
            for k, v in model.state_dict().items()}


def _config(**model):
    """The official training yaml (configs/lightningdit_xl_vavae_f16d32.yaml) at the tiny model's sizes."""
    return {"ckpt_path": "x", "data": {"image_size": 32, "num_classes": 10, "latent_norm": True, "latent_multiplier": 1.0},
            "vae": {"model_name": "vavae_f16d32", "downsample_ratio": 16},
            "model": {"model_type": "LightningDiT-T/1", "encoder_depth": 2, "use_qknorm": False, "use_swiglu": True,
                      "use_rope": True, "use_rmsnorm": True, "wo_shift": False, "in_chans": 32, **model},
            "optimizer": {"lr": 2e-4, "beta2": 0.95}, "transport": {"path_type": "Linear", "prediction": "velocity",
                                                                     "use_cosine_loss": True}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Official-layout files: LightningDiT training checkpoint + bare DDP state dict, VA-VAE LDM checkpoint,
    latents_stats.pt, and an LDM VAE with the wrong downsampling (f8)."""
    root = tmp_path_factory.mktemp("official")
    model = LightningDiT("T/1", **LDIT, exits=[2])
    ema, raw = _random(model, 1), _random(model, 2)
    torch.save({"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": []}, "config": _config()},
               root / "0600000.pt")
    torch.save({"module." + k: v for k, v in ema.items()}, root / "bare.pt")
    torch.save({"state_dict": ldm_state_dict(ch=32)}, root / "vavae.pt")
    torch.save({"state_dict": ldm_state_dict(ch=32, ch_mult=(1, 2, 2, 4))}, root / "vae_f8.pt")
    g = torch.Generator().manual_seed(3)
    torch.save({"mean": torch.randn(1, 32, 1, 1, generator=g), "std": torch.rand(1, 32, 1, 1, generator=g) + 0.5},
               root / "latents_stats.pt")
    return {"root": root, "ckpt": root / "0600000.pt", "bare": root / "bare.pt", "vavae": root / "vavae.pt",
            "f8": root / "vae_f8.pt", "stats": root / "latents_stats.pt", "ema": ema}


def _import(argv, capsys):
    code = igdit(["import-ckpt", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_training_checkpoint_imports_with_everything_from_its_config(files, tmp_path, capsys):
    out = tmp_path / "ldit.ckpt"
    code, printed, _ = _import(["--from", "official-lightningdit", files["ckpt"], "--vae", f"vavae-f16d32:{files['vavae']}",
                                "--latent_stats", files["stats"], "--out", out], capsys)
    assert code == 0 and "LightningDiT-T/1 exits [2]" in printed and "600000" in printed
    module = load_module(out)
    backbone = module.backbone
    assert isinstance(backbone, LightningDiT) and backbone.exit_indices == (2,) and backbone.latent_shape == (32, 2, 2)
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in files["ema"].items())  # the EMA, untouched
    meta = module.data_meta
    assert meta["encoder"]["name"] == "vavae-f16d32" and meta["encoder"]["path"] == str(files["vavae"].resolve())
    assert meta["resolution"] == 32 and meta["normalizer_fit"]["method"] == "latent-stats"
    assert meta["normalizer"] == load_latent_stats(str(files["stats"])).to_dict()
    ckpt = torch.load(out, map_location="cpu", weights_only=True)  # plain containers only
    assert ckpt["igdit_import"]["args"]["model"]["encoder_depth"] == 2 and ckpt["global_step"] == 600000
    # the time conversion lives in the backbone: the network at 1 - t, outputs negated, nothing else
    direct = LightningDiT("T/1", **LDIT, exits=[2]).eval()
    direct.load_state_dict(files["ema"])
    x, t, y = torch.randn(2, 32, 2, 2), torch.tensor([0.2, 0.9]), torch.tensor([1, 10])
    with torch.no_grad():
        ours, theirs = backbone(x, t, y, exits=[2]), direct(x, t, y, exits=[2])
    assert torch.equal(ours.final, theirs.final) and torch.equal(ours.exits[2], theirs.exits[2])


def test_bare_ddp_state_dict_needs_only_what_it_cannot_say(files, tmp_path, capsys):
    out = tmp_path / "bare.ckpt"
    base = ["--from", "official-lightningdit", files["bare"], "--vae", f"vavae-f16d32:{files['vavae']}",
            "--latent_stats", files["stats"], "--out", out]
    # the paper's exit (block 8) and resolution (256 px) do not fit the tiny model: one line each
    code, _, err = _import(base, capsys)
    assert code == 2 and err.startswith("error: --exit: 8") and len(err.splitlines()) == 1 and not out.exists()
    code, _, err = _import(base + ["--exit", "2"], capsys)
    assert code == 2 and err.startswith("error: --vae:") and "256 px" in err and not out.exists()
    code, _, _ = _import(base + ["--exit", "2", "--resolution", "32"], capsys)
    assert code == 0
    state = load_module(out).backbone.state_dict()
    assert all(torch.equal(state[k], v) for k, v in files["ema"].items())


def test_normalisation_follows_the_training_config(files, tmp_path, capsys):
    # a config whose data section omits latent_norm and latent_multiplier: train.py's defaults (no statistics,
    # multiplier 0.18215), exactly what that training run normalised with
    config = _config()
    del config["data"]["latent_norm"], config["data"]["latent_multiplier"]
    torch.save({"ema": files["ema"], "config": config}, tmp_path / "plain.pt")
    out = tmp_path / "plain.ckpt"
    assert _import(["--from", "official-lightningdit", tmp_path / "plain.pt", "--vae", f"vavae-f16d32:{files['vavae']}",
                    "--out", out], capsys)[0] == 0
    meta = load_module(out).data_meta
    assert meta["normalizer"] == {"shift": [0.0] * 32, "scale": [0.18215] * 32}
    assert meta["normalizer_fit"] == {"method": "multiplier", "multiplier": 0.18215}
    # statistics given explicitly are scaled by the multiplier (x = (z - mean) / std * multiplier)
    out2 = tmp_path / "stats.ckpt"
    assert _import(["--from", "official-lightningdit", tmp_path / "plain.pt", "--vae", f"vavae-f16d32:{files['vavae']}",
                    "--latent_stats", files["stats"], "--latent_multiplier", "0.5", "--out", out2], capsys)[0] == 0
    assert load_module(out2).data_meta["normalizer"] == load_latent_stats(str(files["stats"]), 0.5).to_dict()


@pytest.mark.slow
def test_imported_lightningdit_samples_to_png_and_npz(files, tmp_path, capsys):
    out = tmp_path / "ldit.ckpt"
    assert _import(["--from", "official-lightningdit", files["ckpt"], "--vae", f"vavae-f16d32:{files['vavae']}",
                    "--latent_stats", files["stats"], "--out", out], capsys)[0] == 0
    samples = tmp_path / "samples"
    argv = ["sample", "--ckpt", str(out), "--sampler", "heun", "--steps", "3", "--schedule", "shifted",
            "--heun_last_step", "heun", "--heun_decide", "evaluation", "--ig.scale", "1.4", "--cfg.scale", "1.45",
            "--cfg.interval", "[0, 0.81]", "--num", "4", "--labels", "random", "--batch_size", "3", "--out", str(samples),
            "--device", "cpu"]
    assert igdit(argv) == 0
    printed = capsys.readouterr().out
    assert "NFE 6" in printed
    npz = np.load(samples / "samples.npz")
    assert npz["arr_0"].shape == (4, 32, 32, 3) and npz["arr_0"].dtype == np.uint8 and npz["labels"].shape == (4,)
    assert (samples / "samples.png").is_file() and npz["arr_0"].std() > 0
    # the images are the VA-VAE decoding of the normalised latents with the imported normaliser
    module = load_module(out)
    latents = torch.randn(2, 32, 2, 2)
    decoded = decode_latents(latents, module.data_meta)
    assert decoded.shape == (2, 3, 32, 32)


@pytest.mark.slow
def test_imported_sit_samples_with_its_vae(tmp_path, capsys, tiny_vae):
    model = build_backbone("SiT-T/2", input_size=8, in_channels=4, num_classes=10, exits=[2])
    ema = _random(model, 4)
    args = argparse.Namespace(model="SiT-T/2", resolution=16, num_classes=10, path_type="linear")
    torch.save({"model": ema, "ema": ema, "opt": {}, "args": args, "epoch": 1, "steps": 10}, tmp_path / "sit.pt")
    out = tmp_path / "sit.ckpt"
    code, printed, _ = _import(["--from", "official-sit", tmp_path / "sit.pt", "--exit", "2", "--vae",
                                f"diffusers:{tiny_vae}", "--out", out], capsys)
    assert code == 0 and "SiT-T/2 exits [2]" in printed
    assert load_module(out).data_meta["normalizer"]["scale"] == [0.18215] * 4  # the VAE's own scaling
    assert igdit(["sample", "--ckpt", str(out), "--sampler", "sde", "--steps", "4", "--ig.scale", "1.4",
                  "--num", "3", "--out", str(tmp_path / "s"), "--device", "cpu"]) == 0
    assert np.load(tmp_path / "s" / "samples.npz")["arr_0"].shape == (3, 16, 16, 3)


# ---- bad input: one line, nothing written ----------------------------------------------------------------------
def _refused(argv, capsys, out, start, *contains):
    code, _, err = _import(argv, capsys)
    assert code == 2 and err.startswith(start) and len(err.splitlines()) == 1, err
    assert all(c in err for c in contains), err
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


def test_a_missing_sd_vae_hint_names_options_import_ckpt_takes(tmp_path, capsys, monkeypatch, tiny_vae):
    """The hint once named --vae-path, which import-ckpt does not accept; the spelling it gives must import."""
    model = build_backbone("SiT-T/2", input_size=8, in_channels=4, num_classes=10, exits=[2])
    args = argparse.Namespace(model="SiT-T/2", resolution=16, num_classes=10, path_type="linear")
    torch.save({"ema": model.state_dict(), "args": args}, tmp_path / "sit.pt")
    out = tmp_path / "sit.ckpt"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    base = ["--from", "official-sit", tmp_path / "sit.pt", "--exit", "2", "--out", out]
    code, _, err = _import(base + ["--vae", "sd-vae-ft-ema"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: --vae: 'sd-vae-ft-ema'"), err
    assert "hf download stabilityai/sd-vae-ft-ema" in err and str(tmp_path / "empty-cache") in err
    assert "diffusers:<folder>" in err and "--vae-path" not in err and not out.exists()
    code, _, err = _import(base + ["--vae", f"diffusers:{tiny_vae}"], capsys)  # the spelling the hint gives
    assert code == 0 and out.is_file(), err


def test_unknown_format(files, tmp_path, capsys):
    out = tmp_path / "x.ckpt"
    _refused(["--from", "official-dit", files["ckpt"], "--out", out], capsys, out, "error: --from: 'official-dit'",
             "official-sit", "official-lightningdit")


def test_another_family_or_size_names_the_first_mismatching_key(files, tmp_path, capsys):
    out = tmp_path / "x.ckpt"
    vae = ["--vae", f"vavae-f16d32:{files['vavae']}", "--latent_stats", files["stats"]]
    _refused(["--from", "official-lightningdit", files["ckpt"], "--model", "LightningDiT-B/1", "--out", out, *vae],
             capsys, out, "error: --model: 'LightningDiT-B/1'",
             "pos_embed has shape (1, 4, 128) in the checkpoint, the model expects (1, 4, 768)")
    _refused(["--from", "official-sit", files["ckpt"], "--exit", "2", "--out", out, "--vae", "sd-vae-ft-ema"], capsys, out,
             "error: --model: 'SiT-T/1'", "blocks.0.mlp.fc1.weight missing in checkpoint (the model expects shape "
             "(512, 128))", "look like an official-lightningdit checkpoint")
    sit = build_backbone("SiT-T/2", input_size=8, in_channels=4, num_classes=10, exits=[2])
    torch.save(_random(sit, 5), tmp_path / "sit.pt")
    _refused(["--from", "official-lightningdit", tmp_path / "sit.pt", "--exit", "2", "--out", out, *vae], capsys,
             out, "error: --model: 'LightningDiT-T/2'", "feat_rope.freqs_cos missing in checkpoint",
             "look like an official-sit checkpoint")


def test_vae_that_does_not_fit_the_model(files, tmp_path, capsys):
    out = tmp_path / "x.ckpt"
    torch.save({"state_dict": ldm_state_dict(ch=32, z_channels=16)}, tmp_path / "d16.pt")
    base = ["--from", "official-lightningdit", files["ckpt"], "--latent_stats", files["stats"], "--out", out]
    _refused(base + ["--vae", f"ldm-vae:{tmp_path / 'd16.pt'}"], capsys, out, "error: --vae:",
             "16 latent channels; the model denoises 32-channel latents")
    _refused(base + ["--vae", f"ldm-vae:{files['f8']}"], capsys, out, "error: --vae:", "downsamples by 8",
             "downsamples by 16")


def test_missing_vae_or_statistics_file_names_where_it_looked(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "x.ckpt"
    base = ["--from", "official-lightningdit", files["ckpt"], "--out", out]
    _refused(base + ["--vae", f"vavae-f16d32:{tmp_path / 'nope.pt'}"], capsys, out, "error: --vae:", "no such file",
             str(tmp_path / "nope.pt"))
    _refused(base + ["--vae", f"vavae-f16d32:{files['vavae']}", "--latent_stats", tmp_path / "nope.pt"], capsys, out,
             "error: --latent_stats:", "no such file")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    _refused(base, capsys, out, "error: --vae: 'vavae-f16d32'", "hustvl/vavae-imagenet256-f16d32-dinov2",
             str(tmp_path / "empty-cache"))
    _refused(base + ["--vae", f"vavae-f16d32:{files['vavae']}"], capsys, out, "error: --latent_stats:",
             "latents_stats.pt", str(tmp_path / "empty-cache"))


def test_a_preset_for_another_model_is_refused_before_sampling(files, tmp_path, capsys):
    out = tmp_path / "ldit.ckpt"
    assert _import(["--from", "official-lightningdit", files["ckpt"], "--vae", f"vavae-f16d32:{files['vavae']}",
                    "--latent_stats", files["stats"], "--out", out], capsys)[0] == 0
    samples = tmp_path / "samples"
    assert igdit(["sample", "--ckpt", str(out), "--preset", "lightningdit-xl1-ig-cfg", "--num", "2",
                  "--out", str(samples), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --preset: 'lightningdit-xl1-ig-cfg'") and "LightningDiT-T/1" in err
    assert len(err.splitlines()) == 1 and not samples.exists()
