"""LightningDiT backbone with optional Internal-Guidance exit heads (docs/method.md §3.2, §4.1, §7).

LightningDiT is DiT/SiT with RMSNorm (learnable gain), a SwiGLU MLP, 2-D rotary position embedding on queries
and keys (on top of the absolute sin-cos embedding) and optional qk-norm; the released IG model is
LightningDiT-XL/1 on VA-VAE f16d32 latents (32 x 16 x 16), one exit head after block 8.

Parameter and buffer names follow the official LightningDiT+IG code, so its checkpoints load with
``load_state_dict(strict=True)`` (the RoPE tables ``feat_rope.freqs_cos``/``freqs_sin`` are persistent
buffers there, hence here too).

Time: LightningDiT's own time has **t = 0 as noise** (x_t = t x + (1 - t) eps) and the network predicts
data - noise. Everything in this file works in that time; ``Backbone.forward`` alone converts (it calls the
network at 1 - t and negates the final and exit outputs), so callers see the project's t = 1 noise and
v = noise - data.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from jsonargparse.typing import PositiveFloat, PositiveInt
from timm.layers import Mlp, PatchEmbed

from igdit.config import ConfigError
from igdit.models.base import Backbone
from igdit.models.layers import LabelEmbedder, TimestepEmbedder, init_dit_weights, modulate

WIDTHS = {
    "T": dict(depth=6, hidden_size=128, num_heads=4),  # not official: small models for tests and digits
    "S": dict(depth=12, hidden_size=384, num_heads=6),  # not official
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "1p0B": dict(depth=24, hidden_size=1536, num_heads=24),
    "1p6B": dict(depth=28, hidden_size=1792, num_heads=28),
}
LIGHTNINGDIT_SIZES = {f"{width}/{patch}": dict(arch, patch_size=patch)
                      for width, arch in WIDTHS.items() for patch in (1, 2)}
LightningDiTSize = Literal[tuple(LIGHTNINGDIT_SIZES)]


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learnable gain ``weight`` (D,), eps 1e-6 (the Llama recipe).

    The normalisation runs in float32 and is cast back to the input dtype *before* the gain is applied, as in
    the official code (it matters for bit-level parity under bf16).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., D) -> (..., D)."""
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def _norm(dim: int, use_rmsnorm: bool) -> nn.Module:
    """The block and head norm: RMSNorm with gain, or LayerNorm without affine (eps 1e-6) as DiT."""
    return RMSNorm(dim) if use_rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def swiglu_hidden(hidden_size: int, mlp_ratio: float) -> int:
    """SwiGLU hidden width: 2/3 of the GELU MLP's, truncated exactly as the official code does.

    ``int(2/3 * int(D * mlp_ratio))``: XL (1152) -> 3072, L (1024) -> 2730 (no rounding to a multiple of 8).
    The 2/3 keeps the parameter count of the GELU MLP: three D x H matrices instead of two D x 4D.
    """
    return int(2 / 3 * int(hidden_size * mlp_ratio))


class SwiGLUFFN(nn.Module):
    """SwiGLU MLP: ``w3(silu(x1) * x2)`` with ``x1, x2`` the two halves of ``w12(x)`` (x1 first).

    Params: ``w12`` Linear(D, 2H) and ``w3`` Linear(H, D), both with bias. x: (..., D) -> (..., D).
    """

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.w12 = nn.Linear(in_features, 2 * hidden_features)
        self.w3 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the quarter turn of each adjacent pair (EVA's rotate_half)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class VisionRotaryEmbedding(nn.Module):
    """2-D RoPE on a square grid of ``grid_size`` x ``grid_size`` tokens (EVA-02's ``VisionRotaryEmbeddingFast``).

    Each head's dims (head_dim, divisible by 4) are split in two halves: the first half rotates by the token's
    row, the second by its column. Within a half of d = head_dim / 2 dims, adjacent pairs (2i, 2i+1) rotate by
    angle ``pos * theta^(-2i/d)``. Buffers ``freqs_cos``/``freqs_sin``: (T, head_dim) float32, tokens row-major
    (as the patch embedding flattens), each angle repeated for both members of its pair. They are persistent
    (part of the state dict), as in the official checkpoints.
    """

    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0):
        super().__init__()
        half = head_dim // 2
        freqs = 1.0 / (theta ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # (half/2,)
        # The official code writes positions as arange(n) / n * n (a no-op rescale of the trained sequence
        # length); computed the same way so the tables match it bit for bit.
        pos = torch.arange(grid_size) / grid_size * grid_size
        angles = (pos[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # (grid, half): pair members share
        rows = angles[:, None, :].expand(grid_size, grid_size, half)
        cols = angles[None, :, :].expand(grid_size, grid_size, half)
        table = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, 2 * half)
        self.register_buffer("freqs_cos", table.cos())
        self.register_buffer("freqs_sin", table.sin())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, heads, T, head_dim) queries or keys -> the same, rotated."""
        return x * self.freqs_cos + rotate_pairs(x) * self.freqs_sin


class Attention(nn.Module):
    """Multi-head self-attention: ``qkv`` (with bias), optional qk-norm, RoPE on q and k, ``proj``.

    qk-norm is an RMSNorm over each head's dims when ``use_rmsnorm`` (else a LayerNorm with affine, eps 1e-5,
    PyTorch's default, as the official code), applied before the rotation. x: (N, T, D) -> (N, T, D).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, use_rmsnorm: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        norm = RMSNorm if use_rmsnorm else nn.LayerNorm
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Optional[VisionRotaryEmbedding] = None) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class LightningDiTBlock(nn.Module):
    """adaLN-Zero transformer block conditioned on c: (N, D).

    x <- x + gate_msa * Attn(modulate(norm1(x), shift_msa, scale_msa), rope)
    x <- x + gate_mlp * MLP(modulate(norm2(x), shift_mlp, scale_mlp))
    norm1/norm2 are RMSNorms with a gain (or LayerNorms without affine, eps 1e-6, when not ``use_rmsnorm``);
    the MLP is SwiGLU (or the tanh-GELU MLP ``fc1``/``fc2`` when not ``use_swiglu``).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 use_rmsnorm: bool = True, use_swiglu: bool = True):
        super().__init__()
        self.norm1 = _norm(hidden_size, use_rmsnorm)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, use_rmsnorm=use_rmsnorm)
        self.norm2 = _norm(hidden_size, use_rmsnorm)
        if use_swiglu:
            self.mlp = SwiGLUFFN(hidden_size, swiglu_hidden(hidden_size, mlp_ratio))
        else:
            self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio),
                           act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: Optional[VisionRotaryEmbedding] = None) -> torch.Tensor:
        """x: (N, T, D) tokens, c: (N, D) conditioning -> (N, T, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Output head: ``norm_final`` (RMSNorm with gain, or LayerNorm without affine) -> adaLN shift/scale from
    c -> ``linear`` (D -> p*p*C_head). Used for the final head and each IG exit head (own weights).

    With learned sigma the linear is 2C wide per pixel (checkpoint layout) but only the first C channels of
    each patch pixel (the prediction; token features are ordered (p, q, C)) are returned, as the official
    forward keeps only the first half. x: (N, T, D), c: (N, D) -> (N, T, p*p*keep).
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, use_rmsnorm: bool = True,
                 keep: Optional[int] = None):
        super().__init__()
        self.norm_final = _norm(hidden_size, use_rmsnorm)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.patch_pixels, self.out_channels = patch_size * patch_size, out_channels
        self.keep = out_channels if keep is None else keep

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        x = self.linear(modulate(self.norm_final(x), shift, scale))
        if self.keep == self.out_channels:
            return x
        n, t = x.shape[:2]
        return x.reshape(n, t, self.patch_pixels, self.out_channels)[..., :self.keep].reshape(n, t, -1)



class LightningDiT(Backbone):
    """LightningDiT: a DiT with RMSNorm, SwiGLU and 2-D RoPE, predicting data - noise in its own time
    (t = 0 is noise); ``forward`` (from ``Backbone``) returns the project's v (t = 1 noise).

    Args:
        size: a named size, width and patch (``"XL/1"``: depth 28, width 1152, 16 heads, patch 1).
        input_size: latent side H = W, divisible by the patch (16: VA-VAE f16d32 at 256 px).
        in_channels: latent channels C (32 for VA-VAE f16d32).
        num_classes: class labels; label ``num_classes`` is the null label (CFG).
        exits: 1-based blocks in [1, depth - 1]; an exit head (a ``FinalLayer``) reads the residual stream
            after each (the released model: ``[8]``).
        qk_norm: normalise queries and keys per head.  use_rope: 2-D RoPE in every attention.
        use_rmsnorm: RMSNorm with gain (else LayerNorm without affine).  use_swiglu: SwiGLU MLP (else GELU).
        xr_init: init of the exit heads. ``"xavier"`` (official LightningDiT+IG: only ``final_layer`` is zeroed)
            or ``"zero"`` (as the SiT heads).
        learn_sigma: final heads as wide as 2C (checkpoint layout); outputs keep the first C channels.
        depth, hidden_size, num_heads, mlp_ratio: override the named size (small test models).
    """

    family = "LightningDiT"
    sizes = LIGHTNINGDIT_SIZES
    noise_at_zero = True

    def __init__(self, size: LightningDiTSize = "XL/1", *, input_size: PositiveInt = 16,
                 in_channels: PositiveInt = 32, num_classes: PositiveInt = 1000, exits: Sequence[int] = (),
                 qk_norm: bool = False, use_rope: bool = True, use_rmsnorm: bool = True, use_swiglu: bool = True,
                 xr_init: Literal["xavier", "zero"] = "xavier", learn_sigma: bool = False,
                 depth: Optional[PositiveInt] = None, hidden_size: Optional[PositiveInt] = None,
                 num_heads: Optional[PositiveInt] = None, mlp_ratio: PositiveFloat = 4.0):
        super().__init__()
        self.configure(size, input_size=input_size, in_channels=in_channels, num_classes=num_classes, exits=exits,
                       depth=depth, hidden_size=hidden_size, num_heads=num_heads)
        d, heads = self.hidden_size, self.num_heads
        if use_rope and (d // heads) % 4:
            raise ConfigError("model.backbone.num_heads", heads,
                              f"with use_rope the head width hidden_size / num_heads ({d} / {heads}) "
                              "must be divisible by 4 (rows and columns each rotate pairs of dims)")
        self.learn_sigma, self.xr_init = learn_sigma, xr_init
        self.use_rope, self.use_rmsnorm = use_rope, use_rmsnorm
        self.out_channels = in_channels  # what forward returns; the heads' learned-sigma half is dropped in them

        self.x_embedder = PatchEmbed(input_size, self.patch_size, in_channels, d, bias=True)
        self.t_embedder = TimestepEmbedder(d)  # raw t in [0, 1], cat([cos, sin]): as LightningDiT
        self.y_embedder = LabelEmbedder(num_classes, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size ** 2, d), requires_grad=False)
        self.feat_rope = VisionRotaryEmbedding(d // heads, self.grid_size) if use_rope else None
        self.blocks = nn.ModuleList([LightningDiTBlock(d, heads, mlp_ratio, qk_norm, use_rmsnorm, use_swiglu)
                                     for _ in range(self.depth)])
        self.add_heads()
        self.initialize_weights()

    def make_head(self) -> nn.Module:
        """LightningDiT's ``FinalLayer`` (RMSNorm with gain, adaLN, linear); as wide as 2C with learn_sigma (the
        checkpoint layout), keeping the first C channels."""
        head_channels = 2 * self.in_channels if self.learn_sigma else self.in_channels
        return FinalLayer(self.hidden_size, self.patch_size, head_channels, self.use_rmsnorm, keep=self.in_channels)

    def initialize_weights(self) -> None:
        """Official LightningDiT init: the DiT/SiT one (``init_dit_weights``) with only ``final_layer`` zeroed.

        The exit heads keep their xavier init unless ``xr_init == "zero"`` (the official LightningDiT+IG code
        zeroes only ``final_layer``).
        """
        zeroed = [self.final_layer]
        if self.xr_init == "zero":
            zeroed += [self.exit_head(i) for i in self.exit_indices]
        init_dit_weights(self, zeroed)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, C, H, W), t: (N,) in LightningDiT's time (**0 = noise**), y: (N,) long.

        -> (patch tokens plus the fixed sin-cos position embedding (N, T, D), c = t_emb + y_emb (N, D)).
        """
        return self.x_embedder(x) + self.pos_embed, self.t_embedder(t) + self.y_embedder(y)

    def run_block(self, index: int, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Block ``index`` (0-based) on tokens (N, T, D) with conditioning c (N, D) and the shared RoPE tables."""
        return self.blocks[index](tokens, c, self.feat_rope)
