"""The flow-matching loss on the final head."""
from __future__ import annotations

from typing import Optional

import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from igdit.config import UnitInterval
from igdit.objectives.base import LossInputs, LossTerm, LossType, per_sample_loss


class DiffusionLoss(LossTerm):
    """|| v_final - v_target ||^2 per sample (mse, as SiT/IG), or smooth_l1 (beta) / l1."""

    def __init__(self, weight: NonNegativeFloat = 1.0, loss: LossType = "mse", beta: PositiveFloat = 0.05,
                 start_step: NonNegativeInt = 0, stop_step: Optional[PositiveInt] = None,
                 t_range: UnitInterval = (0.0, 1.0)):
        super().__init__(weight, start_step, stop_step, t_range)
        self.loss, self.beta = loss, float(beta)

    def per_sample(self, inputs: LossInputs) -> torch.Tensor:
        return per_sample_loss(inputs.output.final, inputs.target, self.loss, self.beta)
