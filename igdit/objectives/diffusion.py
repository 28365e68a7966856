"""The flow-matching loss on the final head."""
from __future__ import annotations

import torch
from jsonargparse.typing import PositiveFloat

from igdit.objectives.base import LossInputs, LossTerm, LossType, per_sample_loss


class DiffusionLoss(LossTerm):
    """|| v_final - v_target ||^2 per sample (mse, as SiT/IG), or smooth_l1 (beta) / l1."""

    def __init__(self, loss: LossType = "mse", beta: PositiveFloat = 0.05, **kwargs):
        super().__init__(**kwargs)
        self.loss, self.beta = loss, float(beta)

    def per_sample(self, inputs: LossInputs) -> torch.Tensor:
        return per_sample_loss(inputs.output.final, inputs.target, self.loss, self.beta)
