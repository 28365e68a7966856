"""Self-Transcendence stage 1, VAE-based alignment (ST paper §3.2, Eq. 1): a shallow block learns to predict the
latent through a head of its own, so that it holds useful features early (the "M_align" that guides stage 2)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from jsonargparse.typing import NonNegativeFloat, PositiveInt

from igdit.config import UnitInterval
from igdit.objectives.base import (
    LossInputs,
    LossTerm,
    check_block,
    mlp,
    per_sample_loss,
)


class VAEAlignLoss(LossTerm):
    """|| head(h_k) - z ||^2 per sample (mean over C x H x W), h_k the tokens (N, T, D) after block ``block``.

    head: the projector MLP D -> projector_dim -> projector_dim -> D (SiLU), an affine-free LayerNorm (eps 1e-6)
    and Linear(D, p*p*C) per token (no adaLN: the head does not see t or y), unpatchified by the backbone's own
    unpatchify to (N, C, H, W); xavier init, not zero init (the public code's ``projectors`` + ``FinalLayer_2``).
    target: "v", the flow target eps - x (the public code, ``vae_diffloss``: "an additional diffusion loss
    constrained to shallow layers") or "x0", the clean latent (the paper's text: "the ground-truth VAE latent").
    Defaults as the public SiT-B/2 script: block 2, weight 0.5 (``proj-coeff``), t_range [0.4, 0.7] (t = 1 is
    noise), on throughout stage 1 (40 epochs = 200K steps at batch 256).
    """

    def __init__(self, block: PositiveInt = 2, target: Literal["v", "x0"] = "v", projector_dim: PositiveInt = 2048,
                 weight: NonNegativeFloat = 0.5, t_range: UnitInterval = (0.4, 0.7), **kwargs):
        super().__init__(weight=weight, t_range=t_range, **kwargs)
        self.block, self.target, self.projector_dim = int(block), target, int(projector_dim)

    def attach(self, backbone, transport) -> None:
        super().attach(backbone, transport)
        check_block(self.field("block"), self.block, backbone.depth)
        width, p = backbone.hidden_size, backbone.patch_size
        self.projector = mlp(width, self.projector_dim, self.projector_dim, width)
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = mlp(width, p * p * backbone.out_channels)[0]  # one Linear, initialised as the projector

    def hidden_needed(self, step: int) -> tuple[int, ...]:
        return (self.block,)

    def predict(self, hidden: torch.Tensor, backbone) -> torch.Tensor:
        """Tokens (N, T, D) -> the head's latent prediction (N, C, H, W), unpatchified by ``backbone``."""
        return backbone.unpatchify(self.linear(self.norm(self.projector(hidden))))

    def per_sample(self, inputs: LossInputs) -> torch.Tensor:
        target = inputs.target if self.target == "v" else inputs.x
        return per_sample_loss(self.predict(inputs.output.hidden[self.block], inputs.backbone), target)

