"""Import of official SiT+IG checkpoints (docs/method.md §14): layouts, exact weights, shape checks, the CLI."""
import argparse

import pytest
import torch

from igdit.checkpoints import load_module
from igdit.official import import_official, infer_shapes, load_official
from igdit.cli import main as igdit
from igdit.config import ConfigError
from igdit.models import build_backbone
from igdit.module import IGDiTModule


def main(argv):
    return igdit(["import-ckpt", *argv])


def _sizes(module):
    return module.backbone.input_size, module.backbone.in_channels, module.backbone.num_classes

TINY = dict(input_size=8, in_channels=1, num_classes=10)


def _random_state(exits=(2,), seed=0, **kw):
    """A SiT-T/2 state dict (official names) with every tensor random, so nothing equals a fresh init."""
    sizes = {**TINY, **kw}
    model = build_backbone("SiT-T/2", exits=list(exits), **sizes)
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) for k, v in model.state_dict().items()}


def _official(tmp_path, name="official.pt", **kw):
    """A file in the layout of the official train.py: model/ema/opt/args/epoch/steps."""
    model, ema = _random_state(seed=1, **kw), _random_state(seed=2, **kw)
    opt = {"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.zeros(3)}},
           "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 0.0, "params": [0]}]}
    args = argparse.Namespace(model="SiT-T/2", encoder_depth=2, lr=1e-4, results_dir="results", resolution=64)
    path = tmp_path / name
    torch.save({"model": model, "ema": ema, "opt": opt, "args": args, "epoch": 3, "steps": 4000}, path)
    return path, model, ema


def _forward_all(model):
    torch.manual_seed(0)
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 5, 10])
    return model(x, t, y, exits=[2])


def test_official_checkpoint_imports_ema_exactly_and_runs_like_a_directly_loaded_sit(tmp_path):
    path, model_sd, ema_sd = _official(tmp_path)
    out = import_official(path, "official-sit", tmp_path / "model.ckpt", model="SiT-T/2", exits=[2], vae=None)
    module = IGDiTModule.load_from_checkpoint(out, map_location="cpu")  # Lightning's own loader works too
    assert _sizes(module) == (8, 1, 10) and _sizes(load_module(out)) == (8, 1, 10)
    state = module.backbone.state_dict()
    assert state.keys() == ema_sd.keys()
    assert all(torch.equal(state[k], ema_sd[k]) for k in ema_sd)
    assert not torch.equal(state["final_layer_xr.linear.weight"], model_sd["final_layer_xr.linear.weight"])

    direct = build_backbone("SiT-T/2", exits=[2], **TINY)
    direct.load_state_dict(ema_sd, strict=True)
    with torch.no_grad():
        a, b = _forward_all(module.backbone.eval()), _forward_all(direct.eval())
    assert torch.equal(a.final, b.final) and torch.equal(a.exits[2], b.exits[2])

    ckpt = torch.load(out, map_location="cpu", weights_only=True)  # plain containers only
    assert ckpt["global_step"] == 4000 and ckpt["epoch"] == 3
    meta = ckpt["igdit_import"]
    assert meta["source"] == "official-sit" and meta["weights"] == "ema" and meta["path"] == str(path)
    assert meta["args"]["encoder_depth"] == 2 and meta["args"]["model"] == "SiT-T/2"

    out2 = import_official(path, "official-sit", tmp_path / "raw.ckpt",
                           model="SiT-T/2", exits=[2], vae=None, weights="model")
    state2 = IGDiTModule.load_from_checkpoint(out2, map_location="cpu").backbone.state_dict()
    assert all(torch.equal(state2[k], model_sd[k]) for k in model_sd)


def test_bare_and_ddp_prefixed_state_dicts_import(tmp_path):
    sd = _random_state(seed=3)
    torch.save(sd, tmp_path / "bare.pt")
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "ddp.pt")
    for name in ("bare.pt", "ddp.pt"):
        out = import_official(tmp_path / name, "official-sit", tmp_path / f"{name}.ckpt",
                              model="SiT-T/2", exits=[2], vae=None)
        state = IGDiTModule.load_from_checkpoint(out, map_location="cpu").backbone.state_dict()
        assert all(torch.equal(state[k], sd[k]) for k in sd)
    loaded, info = load_official(tmp_path / "ddp.pt", "official-sit")
    assert set(loaded) == set(sd) and info["layout"] == "state_dict" and info["steps"] is None


def test_infers_sizes_from_shapes():
    with torch.device("meta"):
        sd = build_backbone("SiT-B/2", input_size=32, in_channels=4, num_classes=1000, exits=[4]).state_dict()
    assert infer_shapes(sd) == {"input_size": 32, "in_channels": 4, "num_classes": 1000}
    assert tuple(sd["pos_embed"].shape) == (1, 256, 768)  # the shapes of docs/method.md §14
    assert tuple(sd["final_layer_xr.linear.weight"].shape) == (16, 768)
    assert sum(v.numel() for v in sd.values()) == 131_693_600
    assert infer_shapes(_random_state(input_size=16, in_channels=3, num_classes=7)) == \
        {"input_size": 16, "in_channels": 3, "num_classes": 7}


def test_inferred_sizes_build_the_model_and_contradicting_flags_stop(tmp_path):
    sd = _random_state(input_size=16, in_channels=3, num_classes=7)
    torch.save(sd, tmp_path / "w.pt")
    out = import_official(tmp_path / "w.pt", "official-sit", tmp_path / "m.ckpt",
                          model="SiT-T/2", exits=[2], vae=None, input_size=16)
    assert _sizes(load_module(out)) == (16, 3, 7)
    with pytest.raises(ConfigError, match=r"--num_classes: 1000 .*num_classes = 7"):
        import_official(tmp_path / "w.pt", "official-sit", tmp_path / "n.ckpt",
                        model="SiT-T/2", exits=[2], vae=None, num_classes=1000)


def test_shape_mismatch_names_the_first_key_and_both_shapes(tmp_path):
    path, _, _ = _official(tmp_path)
    with pytest.raises(ConfigError, match=r"^--model: 'SiT-T/4' .*pos_embed has shape \(1, 16, 128\) in the "
                                          r"checkpoint, the model expects \(1, 4, 128\)"):
        import_official(path, "official-sit", tmp_path / "a.ckpt", model="SiT-T/4", exits=[2], vae=None)
    # a patch size that does not divide the latent side (12 % 8) is reported the same way
    torch.save(_random_state(input_size=12), tmp_path / "w12.pt")
    with pytest.raises(ConfigError, match=r"^--model: 'SiT-T/8' .*x_embedder\.proj\.weight has shape "
                                          r"\(128, 1, 2, 2\) in the checkpoint, the model expects \(128, 1, 8, 8\)"):
        import_official(tmp_path / "w12.pt", "official-sit", tmp_path / "a.ckpt", model="SiT-T/8", exits=[2], vae=None)
    # a width mismatch further down (blocks.0.attn.qkv) is named too when earlier keys fit
    sd = _random_state()
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match=r"blocks\.0\.attn\.qkv\.weight has shape \(3, 3\) in the checkpoint, "
                                          r"the model expects \(384, 128\)"):
        import_official(tmp_path / "bad.pt", "official-sit", tmp_path / "a.ckpt", model="SiT-T/2", exits=[2], vae=None)
    assert not (tmp_path / "a.ckpt").exists()


def test_missing_exit_head_and_wrong_exit_block_are_named(tmp_path):
    path, _, _ = _official(tmp_path)
    with pytest.raises(ConfigError, match=r"^--exit: \[2, 4\] .*final_layer_xr_2\.linear\.weight "
                                          r"missing in checkpoint"):
        import_official(path, "official-sit", tmp_path / "a.ckpt", model="SiT-T/2", exits=[2, 4], vae=None)
    with pytest.raises(ConfigError, match=r"^--exit: 3 .*encoder_depth"):
        import_official(path, "official-sit", tmp_path / "a.ckpt", model="SiT-T/2", exits=[3], vae=None)
    sd = _random_state()
    torch.save({k: v for k, v in sd.items() if not k.startswith("final_layer_xr")}, tmp_path / "nohead.pt")
    with pytest.raises(ConfigError, match=r"final_layer_xr\.linear\.weight missing in checkpoint"):
        import_official(tmp_path / "nohead.pt", "official-sit", tmp_path / "a.ckpt",
                        model="SiT-T/2", exits=[2], vae=None)
    torch.save({**sd, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(ConfigError, match=r"extra\.weight unexpected in checkpoint"):
        import_official(tmp_path / "extra.pt", "official-sit", tmp_path / "a.ckpt",
                        model="SiT-T/2", exits=[2], vae=None)


def test_bad_files_keys_and_existing_out(tmp_path):
    with pytest.raises(ConfigError, match=r"^--from official-sit: .*no such file"):
        load_official(tmp_path / "nope.pt", "official-sit")
    torch.save({"model": _random_state(), "args": argparse.Namespace(a=1), "steps": 5}, tmp_path / "noema.pt")
    with pytest.raises(ConfigError, match=r"has no 'ema' state dict .*keys present: 'model', 'args', 'steps'"):
        load_official(tmp_path / "noema.pt", "official-sit")
    assert load_official(tmp_path / "noema.pt", "official-sit", weights="model")[1]["steps"] == 5
    with pytest.raises(ConfigError, match=r"^--weights"):
        load_official(tmp_path / "noema.pt", "official-sit", weights="best")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"could not be read"):
        load_official(tmp_path / "junk.pt", "official-sit")

    path, _, _ = _official(tmp_path)
    out = tmp_path / "model.ckpt"
    out.write_bytes(b"keep me")
    with pytest.raises(ConfigError, match=r"^--out: .*already exists"):
        import_official(path, "official-sit", out, model="SiT-T/2", exits=[2], vae=None)
    assert out.read_bytes() == b"keep me"
    import_official(path, "official-sit", out, model="SiT-T/2", exits=[2], vae=None, overwrite=True)
    assert load_module(out).backbone.exit_indices == (2,)


def test_cli_main(tmp_path, capsys, tiny_vae):
    path, _, _ = _official(tmp_path, in_channels=4)  # the tests' tiny VAE: 4 channels, downsampling 2 -> 16 px
    out = tmp_path / "model.ckpt"
    argv = ["--from", "official-sit", str(path), "--model", "SiT-T/2", "--exit", "2", "--out", str(out),
            "--vae", f"diffusers:{tiny_vae}", "--resolution", "16"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "4000" in printed and "parameters" in printed and "decoder" in printed
    assert load_module(out).data_meta["encoder"]["latent_channels"] == 4
    assert main(argv) == 2  # out exists now
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out:") and len(err.splitlines()) == 1
    assert main(argv[:5] + ["--exit", "[2, 4]", "--out", str(tmp_path / "b.ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --exit:") and "final_layer_xr_2" in err and len(err.splitlines()) == 1


def test_load_module_refuses_what_is_not_an_igdit_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match=r"^--ckpt: .*is not a file"):
        load_module(tmp_path / "nope.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"^--ckpt: .*is not a readable igdit checkpoint"):
        load_module(tmp_path / "junk.ckpt")
    torch.save(_random_state(), tmp_path / "bare.ckpt")
    with pytest.raises(ConfigError, match=r"is not an igdit checkpoint.*import-ckpt"):
        load_module(tmp_path / "bare.ckpt")
