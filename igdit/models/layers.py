"""Building blocks of the SiT/DiT backbone: embedders, the adaLN-Zero block and the output head.

Names, shapes and numerics follow the official SiT+IG code (docs/method.md §14) so its checkpoints load
with ``load_state_dict(strict=True)``. Attention, MLP and patch embedding are timm's layers, as there.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn
from timm.layers import Attention, Mlp


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens x: (N, T, D) by per-sample shift, scale: (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t: (N,) -> (N, dim) float32, ``cat([cos(t f), sin(t f)])``.

    f_k = max_period^(-k / (dim/2)), k = 0 .. dim/2 - 1. t is used as given (SiT feeds the raw t in [0, 1],
    no x1000). An odd dim gets one trailing zero column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """t: (N,) in [0, 1] -> (N, D): sinusoidal features, then Linear -> SiLU -> Linear (``mlp.0``, ``mlp.2``)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype)
        return self.mlp(t_freq)


class LabelEmbedder(nn.Module):
    """y: (N,) long in [0, num_classes] -> (N, D). Row ``num_classes`` is the null label used for CFG.

    The table always has the null row. Label dropout is not done here: the training loop replaces labels
    by ``num_classes`` itself, so a forward pass is a pure function of its inputs.
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning on c: (N, D).

    x <- x + gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa))
    x <- x + gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))
    LayerNorms have no affine parameters (eps 1e-6); the MLP uses tanh-approximated GELU.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        # norm_layer is only used for qk-norm; LayerNorm is what the official code's timm version used.
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm,
                              norm_layer=nn.LayerNorm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio),
                       act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (N, T, D) tokens, c: (N, D) conditioning -> (N, T, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Output head: LN (no affine) -> adaLN shift/scale from c -> Linear(D, p*p*C_out).

    Used both for the final head and for each IG exit head (own weights, same design).
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (N, T, D), c: (N, D) -> (N, T, p*p*C_out) patch tokens."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE recipe): (grid_size**2, embed_dim) float32.

    Token order is row-major over (h, w), as ``PatchEmbed`` flattens. The first half of the channels
    encodes the w coordinate, the second half h (MAE's meshgrid puts w first); each half is
    ``cat([sin, cos])`` with frequencies 10000^(-k / (embed_dim/4)). Computed in float64, as MAE.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_h, grid_w = torch.meshgrid(coords, coords, indexing="ij")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([one_axis(grid_w), one_axis(grid_h)], dim=1).float()


def init_dit_weights(model: nn.Module, zero_heads: Iterable[nn.Module]) -> None:
    """The official DiT/SiT init that SiT and LightningDiT share: xavier-uniform Linears with zero biases, the fixed
    sin-cos position embedding, the patch embedding initialised like a Linear, N(0, 0.02) label and timestep
    embeddings, adaLN-Zero blocks (each starts as the identity), and ``zero_heads`` (FinalLayers) that output 0."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    model.pos_embed.data.copy_(get_2d_sincos_pos_embed(model.hidden_size, model.grid_size).unsqueeze(0))
    w = model.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.x_embedder.proj.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    for head in zero_heads:
        nn.init.zeros_(head.adaLN_modulation[-1].weight)
        nn.init.zeros_(head.adaLN_modulation[-1].bias)
        nn.init.zeros_(head.linear.weight)
        nn.init.zeros_(head.linear.bias)
