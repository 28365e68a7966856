"""SiT backbone with optional Internal-Guidance exit heads (METHOD.md §2.2, §10).

One forward pass returns the final prediction, the predictions of the exit heads the caller asked for
and the hidden states of the blocks the caller asked for (``DiTOutput``). Parameter names follow the
official SiT+IG code, so its checkpoints load with ``load_state_dict(strict=True)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from timm.layers import PatchEmbed

from igdit.config import ConfigError, check_number
from igdit.models.layers import FinalLayer, LabelEmbedder, SiTBlock, TimestepEmbedder, get_2d_sincos_pos_embed
from igdit.models.output import DiTOutput


def exit_head_name(idx: int, exits: Sequence[int]) -> str:
    """Attribute name of the exit head after block ``idx`` (1-based) when ``exits`` are configured.

    One exit: ``final_layer_xr`` (the official checkpoint's name). Several: ``final_layer_xr_<idx>``.
    """
    return "final_layer_xr" if len(exits) == 1 else f"final_layer_xr_{idx}"


class SiT(nn.Module):
    """Diffusion transformer predicting the velocity v(x_t, t, y) (t = 1 is noise).

    Args:
        input_size: latent height = width H.  patch_size: p, with H divisible by p.
        in_channels: latent channels C.  hidden_size: width D.  depth: number of blocks.
        num_heads: attention heads (D divisible by it).  num_classes: class labels; label
            ``num_classes`` is the null label (CFG).
        exits: 1-based block indices in [1, depth - 1]; an exit head (a ``FinalLayer``, zero-initialised)
            reads the residual stream after each of these blocks.
        learn_sigma: output 2C channels, as DiT.  qk_norm: LayerNorm on queries and keys.
    """

    def __init__(self, *, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, num_classes: int = 1000,
                 exits: Sequence[int] = (), learn_sigma: bool = False, qk_norm: bool = False):
        super().__init__()
        for field, value in [("input_size", input_size), ("patch_size", patch_size), ("in_channels", in_channels),
                             ("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads),
                             ("num_classes", num_classes)]:
            check_number(f"model.{field}", value, low=1, integer=True)
        check_number("model.mlp_ratio", mlp_ratio, low=0, low_inclusive=False)
        if input_size % patch_size:
            raise ConfigError("model.input_size", input_size, f"must be divisible by the patch size {patch_size}")
        if hidden_size % num_heads:
            raise ConfigError("model.hidden_size", hidden_size, f"must be divisible by num_heads {num_heads}")
        if hidden_size % 4:
            raise ConfigError("model.hidden_size", hidden_size, "must be divisible by 4 (2-D sin-cos position embedding)")
        exits = list(exits)
        for idx in exits:
            if isinstance(idx, bool) or not isinstance(idx, int) or not 1 <= idx <= depth - 1:
                raise ConfigError("model.exits", idx,
                                  f"exit blocks are 1-based indices in [1, {depth - 1}] for depth {depth}")
        if len(set(exits)) != len(exits):
            raise ConfigError("model.exits", exits, "each exit block may appear only once")

        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.hidden_size, self.depth, self.num_heads, self.num_classes = hidden_size, depth, num_heads, num_classes
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.grid_size = input_size // patch_size  # tokens per side; T = grid_size ** 2
        self.exit_indices: tuple[int, ...] = tuple(sorted(exits))

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size ** 2, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)])
        self._exit_head_names = {idx: exit_head_name(idx, exits) for idx in self.exit_indices}
        for idx, name in self._exit_head_names.items():
            setattr(self, name, FinalLayer(hidden_size, patch_size, self.out_channels))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official DiT/SiT init: xavier linears, sin-cos pos_embed, zero adaLN and zero output heads."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.pos_embed.data.copy_(get_2d_sincos_pos_embed(self.hidden_size, self.grid_size).unsqueeze(0))
        w = self.x_embedder.proj.weight.data  # patch embedding initialised like a Linear
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for head in [self.final_layer, *(self.exit_head(i) for i in self.exit_indices)]:  # heads output 0
            nn.init.zeros_(head.adaLN_modulation[-1].weight)
            nn.init.zeros_(head.adaLN_modulation[-1].bias)
            nn.init.zeros_(head.linear.weight)
            nn.init.zeros_(head.linear.bias)

    def exit_head(self, idx: int) -> FinalLayer:
        """The exit head reading the residual stream after block ``idx`` (1-based)."""
        if idx not in self._exit_head_names:
            raise ValueError(f"no exit head after block {idx!r}; this model has exits {list(self.exit_indices)}")
        return getattr(self, self._exit_head_names[idx])

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (N, h*w, p*p*C) -> (N, C, h*p, w*p); each token's features ordered (p, q, C)."""
        n, h, p, c = x.shape[0], self.grid_size, self.patch_size, self.out_channels
        x = x.reshape(n, h, h, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(n, c, h * p, h * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                exits: Sequence[int] = (), hidden: Sequence[int] = ()) -> DiTOutput:
        """x: (N, C, H, W) latents; t: (N,) in [0, 1], 1 = noise; y: (N,) long in [0, num_classes].

        exits: blocks whose exit head to run (each must have a head); hidden: blocks (1-based, in
        [1, depth]) whose output tokens (N, T, D) to return. Nothing else is computed.
        """
        exits, hidden = set(exits), set(hidden)
        missing = sorted(exits - set(self.exit_indices))
        if missing:
            raise ValueError(f"no exit head after block(s) {missing}; this model has exits {list(self.exit_indices)}")
        bad = sorted(i for i in hidden if not (isinstance(i, int) and 1 <= i <= self.depth))
        if bad:
            raise ValueError(f"hidden blocks must be 1-based indices in [1, {self.depth}], got {bad}")

        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        exit_out, hidden_out = {}, {}
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, c)
            if i in hidden:
                hidden_out[i] = x
            if i in exits:
                exit_out[i] = self.unpatchify(self.exit_head(i)(x, c))
        final = self.unpatchify(self.final_layer(x, c))
        return DiTOutput(final=final, exits=exit_out, hidden=hidden_out)
