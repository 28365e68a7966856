"""The Internal Guidance training-acceleration loss (IG paper §4.3): the final head learns a target already pushed
along the weak-to-strong direction of the exit head, which bakes IG's extrapolation into training."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt

from igdit.config import ConfigError
from igdit.objectives.base import LossInputs, LossTerm, LossType, per_sample_loss


class IGAccelLoss(LossTerm):
    """|| D_f - (x0 + omega * sg(D_f - D_i)) ||^2 per sample, in place of the diffusion loss (the IG exit loss
    on D_i stays as it is).

    D_f, D_i: the final head's and the exit head's predictions; sg: stop-gradient, so this term sends no
    gradient to the exit head. space "x0" (default): the paper's formula, on the denoiser outputs
    x0_hat = velocity_to_data(v) (x_t - t v on the linear path); no public code exists for this loss, so the
    paper's text is the reference. "v": in velocity, the final head's target is v + omega * sg(v_f - v_i), the
    loss the IG code trains its other heads with; on the linear path it is the x0 loss divided by t^2 per sample,
    i.e. another weighting over t, not another fixed point.
    omega < 1: the final head's fixed point is D_f = D_i + (E[x0 | x_t] - D_i) / (1 - omega), IG with
    w = 1 / (1 - omega) baked in (omega 0.5 ~ w 2); omega = 0 is the plain diffusion loss. The paper does not
    give omega. exit: the block whose exit head is read as D_i (default: the backbone's first, as the IG sampling rule).
    """

    def __init__(self, omega: NonNegativeFloat = 0.5, space: Literal["x0", "v"] = "x0",
                 exit: Optional[PositiveInt] = None, loss: LossType = "mse", beta: PositiveFloat = 0.05, **kwargs):
        super().__init__(**kwargs)
        self.omega, self.space, self.exit = float(omega), space, exit
        self.loss, self.beta = loss, float(beta)
        self.transport = None

    def attach(self, backbone, transport) -> None:
        super().attach(backbone, transport)
        if self.omega >= 1:
            raise ConfigError(self.field("omega"), self.omega,
                              "expected omega < 1: the final head's fixed point is "
                              "D_f = D_i + (E[x0|x_t] - D_i)/(1 - omega), which has no solution at omega = 1 "
                              "and reverses the guidance beyond it")
        available = tuple(backbone.exit_indices)
        if self.exit is None and available:
            self.exit = available[0]  # as the IG sampling rule: the first exit head
        if self.exit not in available:
            raise ConfigError(self.field("exit"), self.exit, f"the loss reads an exit head as D_i and the backbone "
                              f"has exit heads after blocks {list(available)} (model.backbone.exits)")
        self.transport = transport

    def exits_needed(self, step: int) -> tuple[int, ...]:
        return (self.exit,)

    def per_sample(self, inputs: LossInputs) -> torch.Tensor:
        v_final, v_exit = inputs.output.final, inputs.output.exits[self.exit]
        target = inputs.target + self.omega * (v_final - v_exit).detach()
        prediction = v_final
        if self.space == "x0":  # x0_hat is affine in v, so the x0 target is x0 + omega * sg(D_f - D_i) exactly
            prediction = self.transport.velocity_to_data(v_final, inputs.x_t, inputs.t)
            target = self.transport.velocity_to_data(target, inputs.x_t, inputs.t)
        return per_sample_loss(prediction, target, self.loss, self.beta)
