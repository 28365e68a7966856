"""The LightningDiT backbone: official layout and parameter count, forward parity with a plain transcription of
the official LightningDiT forward (its own time: t = 0 is noise, output data - noise), RoPE, exits and errors."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from igdit.config import ConfigError
from igdit.models import BACKBONES, LightningDiT, build_backbone

# depth 3, width 32, 2 heads (head dim 16), 4 x 4 latents with 4 channels
TINY = dict(input_size=4, in_channels=4, num_classes=5, depth=3, hidden_size=32, num_heads=2)


def _tiny(size="T/1", exits=(2,), **kwargs) -> LightningDiT:
    torch.manual_seed(0)
    return LightningDiT(size, **{**TINY, **kwargs}, exits=exits)


def _perturb(model: LightningDiT, std: float = 0.1) -> LightningDiT:
    """Add noise to every trained weight (zero-init heads, unit gains) so no wrong wiring hides behind a 0 or 1."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def _inputs(model: LightningDiT, n: int = 3):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.tensor([0.1, 0.35, 0.8])[:n]  # far from 0.5, so t and 1 - t differ clearly
    y = torch.tensor([0, 3, model.num_classes])[:n]  # includes the null label
    return x, t, y


# --- a plain transcription of the official LightningDiT forward (LightningDiT/models/*.py), on a state dict ------

def ref_timestep_embedding(t, dim=256, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def ref_pos_embed(embed_dim, grid_size):
    """lightningdit.py get_2d_sincos_pos_embed in numpy (w goes first, float32 grid, float64 frequencies)."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        out = np.einsum("m,d->md", pos.reshape(-1), 1.0 / 10000 ** omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)), 0)
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def ref_rmsnorm(x, weight, eps=1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def ref_rope_tables(head_dim, grid):
    """pos_embed.py VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=grid), einops written out."""
    dim = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(grid) / grid * grid
    f = torch.einsum("i,f->if", t, freqs)
    f = torch.stack([f, f], dim=-1).reshape(grid, dim)  # repeat '... n -> ... (n r)', r=2
    f = torch.cat([f[:, None, :].expand(grid, grid, dim), f[None, :, :].expand(grid, grid, dim)], dim=-1)
    f = f.reshape(grid * grid, 2 * dim)
    return f.cos(), f.sin()


def ref_rope(x, cos, sin):
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).reshape(x.shape)  # rotate_half
    return x * cos + rotated * sin


def ref_norm(x, sd, key, cfg):
    return ref_rmsnorm(x, sd[key + ".weight"]) if cfg["rms"] else F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def ref_attention(x, sd, pre, cfg, rope):
    b, n, c = x.shape
    heads = cfg["heads"]
    qkv = F.linear(x, sd[pre + "qkv.weight"], sd[pre + "qkv.bias"]).reshape(b, n, 3, heads, c // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if cfg["qk_norm"]:
        if cfg["rms"]:
            q, k = ref_rmsnorm(q, sd[pre + "q_norm.weight"]), ref_rmsnorm(k, sd[pre + "k_norm.weight"])
        else:
            q = F.layer_norm(q, (c // heads,), sd[pre + "q_norm.weight"], sd[pre + "q_norm.bias"])
            k = F.layer_norm(k, (c // heads,), sd[pre + "k_norm.weight"], sd[pre + "k_norm.bias"])
    if rope is not None:
        q, k = ref_rope(q, *rope), ref_rope(k, *rope)
    attn = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # the non-fused official path
    x = (attn @ v).transpose(1, 2).reshape(b, n, c)
    return F.linear(x, sd[pre + "proj.weight"], sd[pre + "proj.bias"])


def ref_mlp(x, sd, pre, cfg):
    if cfg["swiglu"]:
        x1, x2 = F.linear(x, sd[pre + "w12.weight"], sd[pre + "w12.bias"]).chunk(2, dim=-1)
        return F.linear(F.silu(x1) * x2, sd[pre + "w3.weight"], sd[pre + "w3.bias"])
    h = F.gelu(F.linear(x, sd[pre + "fc1.weight"], sd[pre + "fc1.bias"]), approximate="tanh")
    return F.linear(h, sd[pre + "fc2.weight"], sd[pre + "fc2.bias"])


def ref_modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def ref_block(x, c, sd, pre, cfg, rope):
    mod = F.linear(F.silu(c), sd[pre + "adaLN_modulation.1.weight"], sd[pre + "adaLN_modulation.1.bias"])
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
    x = x + gate_msa.unsqueeze(1) * ref_attention(ref_modulate(ref_norm(x, sd, pre + "norm1", cfg), shift_msa,
                                                               scale_msa), sd, pre + "attn.", cfg, rope)
    return x + gate_mlp.unsqueeze(1) * ref_mlp(ref_modulate(ref_norm(x, sd, pre + "norm2", cfg), shift_mlp,
                                                            scale_mlp), sd, pre + "mlp.", cfg)


def ref_final(x, c, sd, pre, cfg):
    mod = F.linear(F.silu(c), sd[pre + "adaLN_modulation.1.weight"], sd[pre + "adaLN_modulation.1.bias"])
    shift, scale = mod.chunk(2, dim=1)
    return F.linear(ref_modulate(ref_norm(x, sd, pre + "norm_final", cfg), shift, scale),
                    sd[pre + "linear.weight"], sd[pre + "linear.bias"])


def ref_unpatchify(x, p, c):
    h = w = int(x.shape[1] ** 0.5)
    x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
    return x.reshape(x.shape[0], c, h * p, h * p)


def ref_forward(sd, x, t, y, cfg):
    """Official LightningDiT.forward in its own time (t = 0 noise) -> (final, zsr), both data - noise.

    With learn_sigma the official code keeps the first half of the final output's channels but not of zsr's
    (see the report); both keep it here, as the project's exit heads predict the final head's target.
    """
    p, out_c = cfg["patch"], cfg["out_channels"]
    tokens = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    tokens = tokens.flatten(2).transpose(1, 2) + sd["pos_embed"]
    temb = F.linear(F.silu(F.linear(ref_timestep_embedding(t), sd["t_embedder.mlp.0.weight"],
                                    sd["t_embedder.mlp.0.bias"])), sd["t_embedder.mlp.2.weight"],
                    sd["t_embedder.mlp.2.bias"])
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    rope = ref_rope_tables(cfg["hidden"] // cfg["heads"], x.shape[-1] // p) if cfg["rope"] else None
    zsr = None
    for i in range(cfg["depth"]):
        tokens = ref_block(tokens, c, sd, f"blocks.{i}.", cfg, rope)
        if i + 1 == cfg["encoder_depth"]:
            zsr = ref_unpatchify(ref_final(tokens, c, sd, "final_layer_xr.", cfg), p, out_c)
    out = ref_unpatchify(ref_final(tokens, c, sd, "final_layer.", cfg), p, out_c)
    if cfg["learn_sigma"]:
        out, zsr = out.chunk(2, dim=1)[0], zsr.chunk(2, dim=1)[0]
    return out, zsr


def _cfg(model: LightningDiT, encoder_depth: int, **flags):
    cfg = dict(patch=model.patch_size, hidden=model.hidden_size, heads=model.num_heads, depth=model.depth,
               encoder_depth=encoder_depth, qk_norm=False, rope=True, rms=True, swiglu=True, learn_sigma=False)
    cfg.update(flags)
    cfg["out_channels"] = model.in_channels * (2 if cfg["learn_sigma"] else 1)
    return cfg


# --- registry, official layout, parameter count ---------------------------------------------------------------

def _official_shapes(depth=28, d=1152, heads=16, p=1, c=32, tokens=256, exit_head=True, swiglu_hidden=3072):
    """Every state-dict entry of the official LightningDiT-XL/1+IG (VA-VAE f16d32 config) with its shape."""
    shapes = {"pos_embed": (1, tokens, d), "x_embedder.proj.weight": (d, c, p, p), "x_embedder.proj.bias": (d,),
              "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
              "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
              "y_embedder.embedding_table.weight": (1001, d),
              "feat_rope.freqs_cos": (tokens, d // heads), "feat_rope.freqs_sin": (tokens, d // heads)}
    for i in range(depth):
        shapes.update({f"blocks.{i}.{k}": v for k, v in {
            "norm1.weight": (d,), "norm2.weight": (d,),
            "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,), "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
            "mlp.w12.weight": (2 * swiglu_hidden, d), "mlp.w12.bias": (2 * swiglu_hidden,),
            "mlp.w3.weight": (d, swiglu_hidden), "mlp.w3.bias": (d,),
            "adaLN_modulation.1.weight": (6 * d, d), "adaLN_modulation.1.bias": (6 * d,)}.items()})
    for head in ["final_layer", "final_layer_xr"] if exit_head else ["final_layer"]:
        shapes.update({f"{head}.{k}": v for k, v in {
            "norm_final.weight": (d,), "linear.weight": (p * p * c, d), "linear.bias": (p * p * c,),
            "adaLN_modulation.1.weight": (2 * d, d), "adaLN_modulation.1.bias": (2 * d,)}.items()})
    return shapes


def test_registry_names_the_official_sizes():
    for size in ["B/1", "B/2", "L/1", "L/2", "XL/1", "XL/2", "T/1", "T/2", "S/1"]:
        assert BACKBONES[f"LightningDiT-{size}"] == (LightningDiT, size)
    expected = {"B/1": (12, 768, 12, 1), "L/1": (24, 1024, 16, 1), "XL/1": (28, 1152, 16, 1), "XL/2": (28, 1152, 16, 2)}
    with torch.device("meta"):
        for size, arch in expected.items():
            model = build_backbone(f"LightningDiT-{size}")
            assert (model.depth, model.hidden_size, model.num_heads, model.patch_size) == arch
            assert model.latent_shape == (32, 16, 16) and model.name == f"LightningDiT-{size}"


def test_xl1_with_one_exit_has_the_official_layout_and_parameter_count():
    with torch.device("meta"):
        model = build_backbone("LightningDiT-XL/1", exits=[8])
        base = build_backbone("LightningDiT-XL/1")
        out = model(torch.randn(2, 32, 16, 16), torch.rand(2), torch.zeros(2, dtype=torch.long), exits=[8])
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == _official_shapes()
    assert model.exit_indices == (8,) and out.final.shape == out.exits[8].shape == (2, 32, 16, 16)
    # The paper's count is model.parameters(): it includes the frozen sin-cos pos_embed (a Parameter,
    # 256 * 1152 = 294,912) and excludes the RoPE tables (persistent buffers, 2 * 256 * 72 = 36,864).
    params = sum(p.numel() for p in model.parameters())
    assert params == 677_951_296
    assert sum(v.numel() for v in sd.values()) == 677_951_296 + 36_864
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 677_951_296 - 294_912
    assert sum(p.numel() for p in base.parameters()) == 675_256_736  # docs/method.md §13: the head adds 2,694,560
    assert "final_layer_xr.norm_final.weight" not in base.state_dict()


def test_official_state_dict_loads_strictly_without_renaming():
    model = _tiny(exits=(2,))
    official = {k: torch.randn(shape) for k, shape in _official_shapes(
        depth=3, d=32, heads=2, p=1, c=4, tokens=16, swiglu_hidden=85).items()}
    official["y_embedder.embedding_table.weight"] = torch.randn(6, 32)  # 5 classes + null
    model.load_state_dict(official, strict=True)
    assert torch.equal(model.feat_rope.freqs_cos, official["feat_rope.freqs_cos"])


# --- forward parity with the official forward, through the time conversion -------------------------------------

@pytest.mark.parametrize("size, flags", [
    ("T/1", {}),
    ("T/2", {}),
    ("T/1", dict(qk_norm=True)),
    ("T/1", dict(qk_norm=True, rope=False, rms=False, swiglu=False)),
    ("T/2", dict(learn_sigma=True)),
])
def test_forward_is_the_official_forward_at_one_minus_t_negated(size, flags):
    names = dict(qk_norm="qk_norm", rope="use_rope", rms="use_rmsnorm", swiglu="use_swiglu", learn_sigma="learn_sigma")
    model = _perturb(_tiny(size, exits=(2,), **{names[k]: v for k, v in flags.items()}))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = _cfg(model, encoder_depth=2, **flags)
    x, t, y = _inputs(model)
    with torch.no_grad():
        out = model(x, t, y, exits=[2])
        final, zsr = ref_forward(sd, x, 1 - t, y, cfg)
        wrong_time, _ = ref_forward(sd, x, t, y, cfg)
    torch.testing.assert_close(out.final, -final, rtol=0, atol=2e-6)
    torch.testing.assert_close(out.exits[2], -zsr, rtol=0, atol=2e-6)
    assert out.final.shape == (3, 4, 4, 4)
    # the comparison can tell the conventions apart: not converting, or converting only t, would fail it
    assert (out.final + wrong_time).abs().max() > 1e-2 and (out.final - final).abs().max() > 1e-2


def test_pos_embed_and_rope_tables_are_the_official_ones():
    model = _tiny()
    expected = torch.from_numpy(ref_pos_embed(32, 4)).float()
    torch.testing.assert_close(model.pos_embed[0], expected, rtol=0, atol=1e-7)
    cos, sin = ref_rope_tables(16, 4)
    assert torch.equal(model.feat_rope.freqs_cos, cos) and torch.equal(model.feat_rope.freqs_sin, sin)


def test_init_zeroes_final_head_and_block_adaln_but_exit_head_is_xavier_unless_asked():
    x, t, y = _inputs(_tiny())
    xavier, zero = _tiny(xr_init="xavier"), _tiny(xr_init="zero")
    for model in (xavier, zero):
        assert not model.final_layer.linear.weight.any() and not model.final_layer.adaLN_modulation[1].weight.any()
        assert all(not b.adaLN_modulation[1].weight.any() for b in model.blocks)
    head = xavier.exit_head(2)
    for linear in (head.linear, head.adaLN_modulation[1]):
        bound = math.sqrt(6 / sum(linear.weight.shape))  # xavier-uniform
        assert 0.8 * bound < linear.weight.abs().max() <= bound and not linear.bias.any()
    assert not zero.exit_head(2).linear.weight.any() and not zero.exit_head(2).adaLN_modulation[1].weight.any()
    with torch.no_grad():
        out_x, out_z = xavier(x, t, y, exits=[2]), zero(x, t, y, exits=[2])
    assert not out_x.final.any() and not out_z.final.any() and not out_z.exits[2].any()
    assert out_x.exits[2].abs().min() > 0


# --- RoPE against the formula --------------------------------------------------------------------------------

def test_rope_rotates_adjacent_pairs_by_row_then_column_angles():
    model = _tiny()  # head dim 16: dims 0..7 rotate by the row, 8..15 by the column; grid 4 x 4
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 2, 16, 16, generator=g)
    got = model.feat_rope(q).double()
    expected = q.double().clone()
    d = 8
    for token in range(16):
        row, col = divmod(token, 4)
        for half, pos in ((0, row), (1, col)):
            for i in range(d // 2):
                angle = pos * 10000.0 ** (-2 * i / d)
                a, b = half * d + 2 * i, half * d + 2 * i + 1
                qa, qb = q[..., token, a].double(), q[..., token, b].double()
                expected[..., token, a] = qa * math.cos(angle) - qb * math.sin(angle)
                expected[..., token, b] = qa * math.sin(angle) + qb * math.cos(angle)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert "feat_rope.freqs_sin" in model.state_dict()  # persistent, as in the official checkpoints
    assert _tiny(use_rope=False).feat_rope is None and "feat_rope.freqs_cos" not in _tiny(use_rope=False).state_dict()


def test_rope_scores_depend_only_on_the_offset():
    model = _tiny()
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(16, generator=g).expand(1, 1, 16, 16), torch.randn(16, generator=g).expand(1, 1, 16, 16)
    scores = model.feat_rope(q)[0, 0] @ model.feat_rope(k)[0, 0].T  # same q and k at every token
    # token (r, c) = 4r + c; moving both by one row (or one column) keeps the score
    torch.testing.assert_close(scores[0, 5], scores[4, 9], rtol=0, atol=1e-5)
    torch.testing.assert_close(scores[1, 6], scores[2, 7], rtol=0, atol=1e-5)
    assert (scores[0, 5] - scores[0, 6]).abs() > 1e-4


# --- exits, hidden states, stop_after ---------------------------------------------------------------------------

def test_hidden_exits_and_stop_after_compute_only_what_was_asked():
    model = _perturb(_tiny(exits=(1,)))
    calls = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    for name in ("final_layer", "final_layer_xr"):
        getattr(model, name).register_forward_hook(lambda *_, name=name: calls.append(name))
    x, t, y = _inputs(model)
    with torch.no_grad():
        full = model(x, t, y, hidden=[1, 2, 3])
        assert calls == [0, 1, 2, "final_layer"] and full.exits == {}
        calls.clear()
        early = model(x, t, y, exits=[1], hidden=[1, 2], stop_after=2)
    assert calls == [0, "final_layer_xr", 1]  # the exit head runs right after its block; no block 3, no final
    assert early.final is None and set(early.hidden) == {1, 2} and set(early.exits) == {1}
    assert torch.equal(early.hidden[2], full.hidden[2]) and full.hidden[3].shape == (3, 16, 32)
    with torch.no_grad():  # the exit head reads block 1's tokens with c at 1 - t, and is negated
        tokens, c = model.embed(x, 1 - t, y)
        expected = -model.unpatchify(model.final_layer_xr(model.run_block(0, tokens, c), c))
    torch.testing.assert_close(early.exits[1], expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="no exit head"):
        model(x, t, y, exits=[2])
    with pytest.raises(ValueError, match="stop_after"):
        model(x, t, y, hidden=[3], stop_after=2)


def test_several_exits_are_named_by_block():
    model = _tiny(exits=(2, 1))
    assert model.exit_indices == (1, 2)
    assert hasattr(model, "final_layer_xr_1") and hasattr(model, "final_layer_xr_2")
    assert not hasattr(model, "final_layer_xr")


# --- bad input ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field, value", [
    (dict(exits=[0]), "model.backbone.exits", "0"),
    (dict(exits=[3]), "model.backbone.exits", "3"),
    (dict(size="XL/4"), "model.backbone.size", "'XL/4'"),
    (dict(size="T/2", input_size=5), "model.backbone.input_size", "5"),
    (dict(num_heads=3), "model.backbone.hidden_size", "32"),
    (dict(hidden_size=24, num_heads=4), "model.backbone.num_heads", "4"),  # head dim 6: RoPE needs 4 | head dim
])
def test_bad_config_is_one_line_naming_the_field(kwargs, field, value):
    kwargs = {"size": "T/1", "exits": (), **kwargs}
    with pytest.raises(ConfigError) as err:
        LightningDiT(kwargs.pop("size"), **{**TINY, **kwargs})
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{field}: {value}")


def test_unknown_registered_name_lists_the_choices():
    with pytest.raises(ConfigError) as err:
        build_backbone("LightningDiT-XL/4")
    message = str(err.value)
    assert "\n" not in message and message.startswith("model.backbone") and "LightningDiT-XL/1" in message
