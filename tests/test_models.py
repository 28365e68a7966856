"""The SiT backbone: official SiT+IG layout (docs/method.md §14), exit heads, and numerics."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from igdit.config import ConfigError
from igdit.models import BACKBONES, SiT, build_backbone, exit_head_name
from igdit.models.sit import SIT_SIZES
from igdit.models.layers import get_2d_sincos_pos_embed, timestep_embedding

TINY = dict(size="T/2", input_size=8, in_channels=3, hidden_size=32, depth=4, num_heads=4, num_classes=5)


def _tiny(exits=(2,), **kwargs) -> SiT:
    torch.manual_seed(0)
    return SiT(**{**TINY, **kwargs}, exits=exits)


def _randomize(model: SiT, std: float = 0.1) -> SiT:
    """Make every trainable weight nonzero so no zero-init hides a wrong wiring."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _inputs(model: SiT, n: int = 2):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.rand(n, generator=g)
    y = torch.randint(0, model.num_classes + 1, (n,), generator=g)  # includes the null label
    return x, t, y


def _condition(model: SiT, t, y):
    return model.t_embedder(t) + model.y_embedder(y)


# --- registry and official layout -------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in BACKBONES if n.startswith("SiT-")])
def test_every_registered_size_builds_with_right_shapes(name):
    arch = SIT_SIZES[name[len("SiT-"):]]
    patch = arch["patch_size"]
    exit_block = 2 if name.startswith("SiT-T/") else 4
    with torch.device("meta"):
        model = build_backbone(name, input_size=32, in_channels=4, num_classes=1000, exits=[exit_block])
        x, t, y = torch.randn(2, 4, 32, 32), torch.rand(2), torch.randint(0, 1001, (2,))
        out = model(x, t, y, exits=[exit_block], hidden=[1, arch["depth"]])
    tokens = (32 // patch) ** 2
    assert (model.depth, model.hidden_size, model.patch_size) == (arch["depth"], arch["hidden_size"], patch)
    assert model.pos_embed.shape == (1, tokens, arch["hidden_size"])
    assert model.final_layer.linear.weight.shape == (patch * patch * 4, arch["hidden_size"])
    assert out.final.shape == out.exits[exit_block].shape == (2, 4, 32, 32)
    assert out.hidden[arch["depth"]].shape == (2, tokens, arch["hidden_size"])


def _official_sit_b2_shapes(exit_head: bool) -> dict:
    """docs/method.md §14: SiT-B/2, 256 px, SD-VAE latents 4x32x32, 1000 classes (+1 null)."""
    d = 768
    shapes = {
        "pos_embed": (1, 256, d),
        "x_embedder.proj.weight": (d, 4, 2, 2), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (1001, d),
    }
    for n in range(12):
        for key, shape in {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (4 * d, d),
                           "mlp.fc2": (d, 4 * d), "adaLN_modulation.1": (6 * d, d)}.items():
            shapes[f"blocks.{n}.{key}.weight"], shapes[f"blocks.{n}.{key}.bias"] = shape, shape[:1]
    for head in ["final_layer_xr", "final_layer"] if exit_head else ["final_layer"]:
        shapes.update({f"{head}.adaLN_modulation.1.weight": (2 * d, d), f"{head}.adaLN_modulation.1.bias": (2 * d,),
                       f"{head}.linear.weight": (16, d), f"{head}.linear.bias": (16,)})
    return shapes


def test_sit_b2_matches_official_checkpoint_layout():
    with torch.device("meta"):
        model = build_backbone("SiT-B/2", input_size=32, in_channels=4, num_classes=1000, exits=[4])
        plain = build_backbone("SiT-B/2", input_size=32, in_channels=4, num_classes=1000, exits=[])
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == _official_sit_b2_shapes(exit_head=True)
    assert {k: tuple(v.shape) for k, v in plain.state_dict().items()} == _official_sit_b2_shapes(exit_head=False)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) == 131_693_600
    assert count(model) - count(plain) == 1_193_488
    assert not model.pos_embed.requires_grad


def test_official_state_dict_loads_strictly():
    model = _randomize(_tiny(exits=(2,)))
    fresh = _tiny(exits=(2,))
    fresh.load_state_dict(model.state_dict(), strict=True)
    x, t, y = _inputs(model)
    with torch.no_grad():
        a, b = model(x, t, y, exits=[2]), fresh(x, t, y, exits=[2])
    torch.testing.assert_close(a.final, b.final, rtol=0, atol=0)
    torch.testing.assert_close(a.exits[2], b.exits[2], rtol=0, atol=0)


def test_single_exit_is_named_like_the_official_head_and_several_by_block():
    assert exit_head_name(4, [4]) == "final_layer_xr"
    assert exit_head_name(4, [2, 4]) == "final_layer_xr_4"
    one, two = _tiny(exits=(2,)), _tiny(exits=(3, 1))
    assert hasattr(one, "final_layer_xr") and one.exit_indices == (2,)
    assert {k.split(".")[0] for k in two.state_dict() if k.startswith("final_layer_xr")} == \
        {"final_layer_xr_1", "final_layer_xr_3"}
    assert two.exit_indices == (1, 3)
    assert two.exit_head(3) is two.final_layer_xr_3


def test_learn_sigma_doubles_output_channels():
    model = _tiny(exits=(2,), learn_sigma=True)
    out = model(*_inputs(model), exits=[2])
    assert out.final.shape == out.exits[2].shape == (2, 6, 8, 8)


def test_qk_norm_adds_query_and_key_norms():
    model = _tiny(exits=(), qk_norm=True)
    assert "blocks.0.attn.q_norm.weight" in model.state_dict()
    assert "blocks.0.attn.q_norm.weight" not in _tiny(exits=()).state_dict()


# --- exit heads ---------------------------------------------------------------------------------------

def test_exit_head_is_zero_at_init():
    model = _tiny(exits=(1, 3))
    out = model(*_inputs(model), exits=[1, 3])
    for pred in [out.final, out.exits[1], out.exits[3]]:
        assert torch.equal(pred, torch.zeros_like(pred))


def test_exit_head_skipped_when_not_requested():
    model = _randomize(_tiny(exits=(1, 3)))
    calls = []
    for idx in (1, 3):
        model.exit_head(idx).register_forward_hook(lambda *_, idx=idx: calls.append(idx))
    x, t, y = _inputs(model)
    assert model(x, t, y).exits == {} and calls == []
    assert set(model(x, t, y, exits=[3]).exits) == {3} and calls == [3]


def test_exit_prediction_is_the_head_applied_after_its_block():
    model = _randomize(_tiny(exits=(2,)))
    x, t, y = _inputs(model)
    with torch.no_grad():
        out = model(x, t, y, exits=[2], hidden=[2, 4])
        c = _condition(model, t, y)
        expected_exit = model.unpatchify(model.final_layer_xr(out.hidden[2], c))
        expected_final = model.unpatchify(model.final_layer(out.hidden[4], c))
    assert out.exits[2].abs().mean() > 0.01
    torch.testing.assert_close(out.exits[2], expected_exit, rtol=0, atol=0)
    torch.testing.assert_close(out.final, expected_final, rtol=0, atol=0)


def test_hidden_states_only_for_requested_blocks():
    model = _tiny(exits=())
    out = model(*_inputs(model, n=3), hidden=[1, 4])
    assert set(out.hidden) == {1, 4}
    assert all(h.shape == (3, 16, 32) for h in out.hidden.values())
    assert model(*_inputs(model)).hidden == {}


def test_asking_for_a_missing_exit_or_block_fails_clearly():
    model = _tiny(exits=(2,))
    x, t, y = _inputs(model)
    with pytest.raises(ValueError, match=r"exits \[2\]"):
        model(x, t, y, exits=[3])
    with pytest.raises(ValueError, match="hidden"):
        model(x, t, y, hidden=[5])


# --- numerics -------------------------------------------------------------------------------------------

def test_timestep_embedding_uses_raw_t_cos_then_sin():
    t = torch.tensor([0.0, 0.5, 1.0])
    expected = torch.empty(3, 256, dtype=torch.float64)
    for i, ti in enumerate(t.tolist()):
        for k in range(128):
            arg = ti * math.exp(-math.log(10000) * k / 128)
            expected[i, k], expected[i, 128 + k] = math.cos(arg), math.sin(arg)
    emb = timestep_embedding(t, 256)
    torch.testing.assert_close(emb.double(), expected, rtol=0, atol=1e-6)
    model = _tiny(exits=())
    torch.testing.assert_close(model.t_embedder(t), model.t_embedder.mlp(emb))


def test_pos_embed_is_the_mae_sincos_recipe():
    def mae_1d(dim, pos):  # facebookresearch/mae util/pos_embed.py, in numpy
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    dim, size = 32, 4
    grid = np.stack(np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32)), axis=0)
    expected = np.concatenate([mae_1d(dim // 2, grid[0]), mae_1d(dim // 2, grid[1])], axis=1)
    torch.testing.assert_close(get_2d_sincos_pos_embed(dim, size), torch.from_numpy(expected).float())
    torch.testing.assert_close(_tiny(exits=()).pos_embed[0], get_2d_sincos_pos_embed(32, 4))


def test_unpatchify_inverts_patchify():
    model = _tiny(exits=())
    n, c, p, h = 2, model.in_channels, model.patch_size, model.grid_size
    imgs = torch.randn(n, c, h * p, h * p)
    tokens = torch.einsum("nchpwq->nhwpqc", imgs.reshape(n, c, h, p, h, p)).reshape(n, h * h, p * p * c)
    assert torch.equal(model.unpatchify(tokens), imgs)
    # token i*h + j covers pixels [i*p:(i+1)*p, j*p:(j+1)*p], the order PatchEmbed flattens in
    one_hot = torch.zeros(1, h * h, p * p * c)
    one_hot[0, 1 * h + 2] = 1.0
    img = model.unpatchify(one_hot)[0]
    assert img[:, p:2 * p, 2 * p:3 * p].eq(1).all() and img.sum() == p * p * c


def _reference_block(block, x, c):
    """One SiT block in plain torch ops, following docs/method.md §14."""
    d = x.shape[-1]
    heads = block.attn.num_heads
    mod = F.linear(F.silu(c), block.adaLN_modulation[1].weight, block.adaLN_modulation[1].bias)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:, None].chunk(6, dim=-1)
    h = F.layer_norm(x, (d,), eps=1e-6) * (1 + scale_msa) + shift_msa
    q, k, v = F.linear(h, block.attn.qkv.weight, block.attn.qkv.bias).chunk(3, dim=-1)
    q, k, v = (z.reshape(*z.shape[:2], heads, d // heads).transpose(1, 2) for z in (q, k, v))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
    att = att.transpose(1, 2).reshape(x.shape)
    x = x + gate_msa * F.linear(att, block.attn.proj.weight, block.attn.proj.bias)
    h = F.layer_norm(x, (d,), eps=1e-6) * (1 + scale_mlp) + shift_mlp
    h = F.gelu(F.linear(h, block.mlp.fc1.weight, block.mlp.fc1.bias), approximate="tanh")
    return x + gate_mlp * F.linear(h, block.mlp.fc2.weight, block.mlp.fc2.bias)


def test_block_matches_handwritten_reference():
    model = _randomize(_tiny(exits=()), std=0.2)
    g = torch.Generator().manual_seed(3)
    x, c = torch.randn(2, 16, 32, generator=g), torch.randn(2, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[0](x, c), _reference_block(model.blocks[0], x, c), rtol=0, atol=1e-5)
        head = model.final_layer
        shift, scale = F.linear(F.silu(c), head.adaLN_modulation[1].weight, head.adaLN_modulation[1].bias).chunk(2, -1)
        expected = F.linear(F.layer_norm(x, (32,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None],
                            head.linear.weight, head.linear.bias)
        torch.testing.assert_close(head(x, c), expected, rtol=0, atol=1e-5)


# --- validation ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field, value", [
    (dict(exits=[0]), "model.backbone.exits", "0"),
    (dict(exits=[4]), "model.backbone.exits", "4"),
    (dict(exits=[2, 2]), "model.backbone.exits", "[2, 2]"),
    (dict(exits=[], input_size=9), "model.backbone.input_size", "9"),
    (dict(exits=[], num_heads=5), "model.backbone.hidden_size", "32"),
    (dict(exits=[], size="M/2"), "model.backbone.size", "M/2"),
])
def test_bad_model_config_is_one_line_naming_field_and_value(kwargs, field, value):
    with pytest.raises(ConfigError) as err:
        SiT(**{**TINY, **kwargs})
    message = str(err.value)
    assert "\n" not in message and message.startswith(field) and value in message


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ConfigError) as err:
        build_backbone("SiT-M/2", input_size=32, in_channels=4, num_classes=10, exits=[])
    message = str(err.value)
    assert "\n" not in message and message.startswith("model.backbone") and "SiT-M/2" in message and "SiT-XL/2" in message


def test_build_backbone_overrides_the_named_size():
    model = build_backbone("SiT-T/2", input_size=8, in_channels=3, num_classes=5, exits=[1], depth=2, hidden_size=64,
                           num_heads=4)
    assert (model.depth, model.hidden_size, model.blocks[0].attn.num_heads, model.patch_size) == (2, 64, 4, 2)


def test_families_register_their_sizes_and_build_by_name():
    model = build_backbone("SiT-S/4", input_size=16, in_channels=3, num_classes=7, exits=[3])
    assert isinstance(model, SiT) and model.name == "SiT-S/4" and (model.depth, model.patch_size) == (12, 4)
    assert BACKBONES["SiT-XL/2"] == (SiT, "XL/2")


def test_stop_after_runs_only_the_blocks_it_needs_and_no_final_head():
    model = _randomize(_tiny(exits=(2,)))
    calls = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda *a, i=i: calls.append(i))
    x, t, y = _inputs(model)
    full = model(x, t, y, hidden=[2])
    calls.clear()
    early = model(x, t, y, hidden=[2], stop_after=2)
    assert calls == [0, 1] and early.final is None
    torch.testing.assert_close(early.hidden[2], full.hidden[2], rtol=0, atol=0)
    with pytest.raises(ValueError, match="stop_after"):
        model(x, t, y, hidden=[3], stop_after=2)
