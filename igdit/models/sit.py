"""SiT backbone with optional Internal-Guidance exit heads (docs/method.md §3.2, §14).

Parameter names follow the official SiT+IG code, so its checkpoints load with ``load_state_dict(strict=True)``.
SiT uses the project's time (t = 1 is noise) and predicts v = eps - x, so nothing is converted.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
import torch.nn as nn
from jsonargparse.typing import PositiveFloat, PositiveInt
from timm.layers import PatchEmbed

from igdit.models.base import Backbone
from igdit.models.layers import FinalLayer, LabelEmbedder, SiTBlock, TimestepEmbedder, init_dit_weights

WIDTHS = {
    "T": dict(depth=6, hidden_size=128, num_heads=4),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
SIT_SIZES = {f"{width}/{patch}": dict(arch, patch_size=patch) for width, arch in WIDTHS.items() for patch in (1, 2, 4, 8)}
SiTSize = Literal[tuple(SIT_SIZES)]


class SiT(Backbone):
    """Diffusion transformer predicting the velocity v(x_t, t, y) (t = 1 is noise); the SiT/DiT architecture.

    Args:
        size: a named size, width and patch (``"XL/2"``: depth 28, width 1152, 16 heads, patch 2).
        input_size: latent side H = W, divisible by the patch.  in_channels: latent channels C.
        num_classes: class labels; label ``num_classes`` is the null label (CFG).
        exits: 1-based blocks in [1, depth - 1]; an exit head (a ``FinalLayer``, zero-initialised as in the
            official code) reads the residual stream after each.
        qk_norm: LayerNorm on queries and keys.  learn_sigma: output 2C channels, as DiT.
        depth, hidden_size, num_heads, mlp_ratio: override the named size (small test models).
    """

    family = "SiT"
    sizes = SIT_SIZES

    def __init__(self, size: SiTSize = "XL/2", *, input_size: PositiveInt = 32, in_channels: PositiveInt = 4,
                 num_classes: PositiveInt = 1000, exits: Sequence[int] = (), qk_norm: bool = False,
                 learn_sigma: bool = False, depth: Optional[PositiveInt] = None,
                 hidden_size: Optional[PositiveInt] = None, num_heads: Optional[PositiveInt] = None,
                 mlp_ratio: PositiveFloat = 4.0):
        super().__init__()
        self.configure(size, input_size=input_size, in_channels=in_channels, num_classes=num_classes, exits=exits,
                       depth=depth, hidden_size=hidden_size, num_heads=num_heads)
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        d = self.hidden_size

        self.x_embedder = PatchEmbed(input_size, self.patch_size, in_channels, d, bias=True)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(num_classes, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size ** 2, d), requires_grad=False)
        self.blocks = nn.ModuleList([SiTBlock(d, self.num_heads, mlp_ratio, qk_norm) for _ in range(self.depth)])
        self.add_heads()
        self.initialize_weights()

    def make_head(self) -> nn.Module:
        """SiT's adaLN ``FinalLayer`` (the exit heads are the same design with their own weights)."""
        return FinalLayer(self.hidden_size, self.patch_size, self.out_channels)

    def initialize_weights(self) -> None:
        """Official DiT/SiT init (``init_dit_weights``); every output head, exit heads included, starts at 0."""
        init_dit_weights(self, [self.final_layer, *(self.exit_head(i) for i in self.exit_indices)])

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens plus the fixed position embedding (N, T, D); c = t_emb + y_emb (N, D)."""
        return self.x_embedder(x) + self.pos_embed, self.t_embedder(t) + self.y_embedder(y)
