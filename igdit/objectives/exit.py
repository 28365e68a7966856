"""The Internal Guidance exit loss: every exit head regresses the same velocity target as the final head."""
from __future__ import annotations

from typing import Optional

import torch
from jsonargparse.typing import NonNegativeFloat, PositiveFloat

from igdit.config import ConfigError
from igdit.objectives.base import LossInputs, LossTerm, LossType, per_sample_loss


class ExitLoss(LossTerm):
    """The IG exit loss on the backbone's exit heads (all of them, or ``exits``).

    weight 0.5 as the official code (hard-coded there; the paper reports lambda <= 0.5 works). The official
    code computes MSE (its --loss-type flag is never read); smooth_l1 (beta) and l1 are options. With several
    exits the term is their mean, so the weight means the same for any number of heads.
    """

    def __init__(self, weight: NonNegativeFloat = 0.5, loss: LossType = "mse", beta: PositiveFloat = 0.05,
                 exits: Optional[list[int]] = None, **kwargs):
        super().__init__(weight=weight, **kwargs)
        self.loss, self.beta, self.exits = loss, float(beta), None if exits is None else tuple(exits)

    def attach(self, backbone, transport) -> None:
        super().attach(backbone, transport)
        available = tuple(backbone.exit_indices)
        if self.exits is None:
            self.exits = available
        missing = [i for i in self.exits if i not in available]
        if missing:
            raise ConfigError(self.field("exits"), list(self.exits),
                              f"the backbone has exit heads after blocks {list(available)} (model.backbone.exits)")
        if self.weight > 0 and not self.exits:
            raise ConfigError(self.field("weight"), self.weight,
                              "needs at least one exit head in model.backbone.exits (or set it to 0)")

    def exits_needed(self, step: int) -> tuple[int, ...]:
        return self.exits

    def per_sample(self, inputs: LossInputs) -> torch.Tensor:
        per_exit = [per_sample_loss(inputs.output.exits[i], inputs.target, self.loss, self.beta) for i in self.exits]
        return torch.stack(per_exit).mean(0)
