"""Dispersive loss (Wang & He 2025, "Diffuse and Disperse"): push a block's representations of the samples in a
batch apart, InfoNCE without positive pairs (docs/method.md §12.4)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt

from igdit.objectives.base import LossInputs, LossTerm, check_block


def dispersive_loss(z: torch.Tensor, tau: float) -> torch.Tensor:
    """z: (B, ...) one representation per sample -> log((1/B^2) sum_{i,j} exp(-||z_i - z_j||^2 / (d tau))), d the
    flattened size; the B diagonal pairs (distance 0) are included, as the JAX original. Minimum -log B.

    Computed from the B(B-1)/2 pairwise distances (torch.pdist, each off-diagonal pair counted twice) with a
    log-sum-exp, in float32."""
    z = z.flatten(1).float()
    b, d = z.shape
    scaled = F.pdist(z).pow(2) / (d * tau)
    logits = torch.cat([-scaled, -scaled, torch.zeros(b, device=z.device)])
    return torch.logsumexp(logits, 0) - 2 * math.log(b)


class DispersiveLoss(LossTerm):
    """L_disp on the flattened output of one block over the (per-device) batch; a batch-level term.

    weight, tau: lambda and the temperature, 0.5 and 0.5 (the paper's JAX runs, local batch 16; the PyTorch release
        uses 0.25 and 1 on the last block at local batch 32). block: 1-based; None = depth // 4 (the paper).
    t_range: per_sample: only samples with t inside count, by taking the others out of the batch before the loss
        (with fewer than two samples inside the loss is 0); official_broadcast: the loss over the whole batch times
        the fraction inside.
    """

    def __init__(self, weight: NonNegativeFloat = 0.5, tau: PositiveFloat = 0.5, block: Optional[PositiveInt] = None,
                 **kwargs):
        super().__init__(weight=weight, **kwargs)
        self.tau, self.block = float(tau), block

    def attach(self, backbone, transport) -> None:
        super().attach(backbone, transport)
        if self.block is None:
            self.block = max(1, backbone.depth // 4)
        check_block(self.field("block"), self.block, backbone.depth)

    def hidden_needed(self, step: int) -> tuple[int, ...]:
        return (self.block,)

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        z = inputs.output.hidden[self.block]
        if self.t_range != (0.0, 1.0):
            z = z[self.counted(inputs.t)]
        if z.shape[0] < 2:  # nothing to disperse; a zero that keeps the graph (every rank runs the same backward)
            return inputs.output.hidden[self.block].sum() * 0.0
        return self.reduce(dispersive_loss(z, self.tau), inputs.t)
