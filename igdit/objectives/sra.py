"""SRA, self-representation alignment (Jiang et al. 2025; vvvvvjdy/SRA, the code base IG was forked from):
the student's earlier block at t regresses, through a small head, onto the EMA model's later block at a less
noisy t' (docs/method.md §12.2)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)

from igdit.config import ConfigError
from igdit.objectives.base import (
    LossInputs,
    LossTerm,
    check_block,
    mlp,
    per_sample_loss,
)


@dataclass
class TenfoldDecay:
    """The weight stays at its value until ``start_step``, then falls tenfold every ``steps`` steps:
    w(s) = w * 0.1 ** ((s - start_step) / steps). SRA at 256 px: from epoch 149, tenfold per 1000 epochs."""

    start_step: NonNegativeInt
    steps: PositiveInt


def teacher_times(t: torch.Tensor, t_max: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """t' = clamp(t - t_max * U(0, 1), min=0) per sample: the teacher's less noisy time (t = 1 is noise)."""
    u = torch.rand(t.shape, device=t.device, dtype=t.dtype, generator=generator)
    return (t - t_max * u).clamp(min=0.0)


def sra_distance(pred: torch.Tensor, target: torch.Tensor, loss: str = "smooth_l1", beta: float = 0.05) -> torch.Tensor:
    """(N, T, D), (N, T, D) -> (N,): smooth-L1 (beta) averaged over tokens and features, or ``cos``: 1 - the cosine
    similarity of each token pair (over the D features), averaged over the tokens."""
    if loss == "cos":
        return 1.0 - F.cosine_similarity(pred.float(), target.float(), dim=-1).mean(1)
    return per_sample_loss(pred, target, "smooth_l1", beta)


class SRALoss(LossTerm):
    """Student hidden[block] -> head Linear(D, 2D)-SiLU-Linear(2D, D) vs the EMA teacher's raw hidden[teacher_block]
    at t' = clamp(t - U(0, t_max), 0), on x re-interpolated at t' with the same noise and the same (dropped)
    labels; the teacher runs in eval mode, without gradient, and stops after teacher_block.

    The teacher is the EMA model Lightning's EMAWeightAveraging keeps (``LossInputs.ema_backbone``); no second EMA.
    weight: 0.2 (the paper and the legacy code; smooth-L1). block, teacher_block: 1-based; 8 -> 20 for SiT-XL/2, the
        code's argparse default 4 -> 8 otherwise. t_max: 0.2.
    loss: ``smooth_l1`` (beta 0.05, mean over tokens and features: the paper and the legacy code) or ``cos``: one
        minus the cosine similarity of each token pair, averaged over tokens. The current public code's ``cos``
        calls F.cosine_similarity on (N, T, D) with its default dim=1, i.e. across tokens for each feature; that
        is a quirk and not reproduced here. The current code weighs ``cos`` by 0.5 with no decay.
    schedule: the weight's tenfold decay (``TenfoldDecay``); None keeps it constant.
    """

    reads_ema = True

    def __init__(self, weight: NonNegativeFloat = 0.2, block: PositiveInt = 4, teacher_block: PositiveInt = 8,
                 t_max: ClosedUnitInterval = 0.2, loss: Literal["smooth_l1", "cos"] = "smooth_l1",
                 beta: PositiveFloat = 0.05, schedule: Optional[TenfoldDecay] = None, **kwargs):
        super().__init__(weight=weight, **kwargs)
        self.block, self.teacher_block, self.t_max = block, teacher_block, float(t_max)
        self.loss, self.beta = loss, float(beta)
        self.schedule = TenfoldDecay(**schedule) if isinstance(schedule, dict) else schedule

    def attach(self, backbone, transport) -> None:
        super().attach(backbone, transport)
        check_block(self.field("block"), self.block, backbone.depth)
        check_block(self.field("teacher_block"), self.teacher_block, backbone.depth)
        d = backbone.hidden_size
        self.projector = mlp(d, 2 * d, d)

    def weight_at(self, step: int) -> float:
        if self.schedule is None or step <= self.schedule.start_step:
            return self.weight
        return self.weight * 0.1 ** ((step - self.schedule.start_step) / self.schedule.steps)

    def hidden_needed(self, step: int) -> tuple[int, ...]:
        return (self.block,)

    @torch.no_grad()
    def teacher_features(self, inputs: LossInputs) -> torch.Tensor:
        """(N, T, D) raw hidden state after teacher_block of the EMA backbone at t' (no graph is built)."""
        teacher = inputs.ema_backbone
        if teacher is None:
            raise ConfigError(f"model.terms.{self.name}", type(self).__name__,
                              "its teacher is the EMA model: add lightning.pytorch.callbacks.EMAWeightAveraging to "
                              "trainer.callbacks (LossInputs.ema_backbone is None)")
        t_teacher = teacher_times(inputs.t, self.t_max, inputs.generator)
        x_teacher, _ = inputs.transport.interpolate(inputs.x, inputs.noise, t_teacher)
        was_training = teacher.training
        teacher.eval()
        try:
            out = teacher(x_teacher, t_teacher, inputs.y, hidden=(self.teacher_block,), stop_after=self.teacher_block)
        finally:
            teacher.train(was_training)
        self.logged["t_gap"] = (inputs.t - t_teacher).mean()
        return out.hidden[self.teacher_block]

    def per_sample(self, inputs: LossInputs) -> torch.Tensor:
        target = self.teacher_features(inputs)
        if self.schedule is not None:
            self.logged["weight"] = torch.tensor(self.weight_at(inputs.step))
        return sra_distance(self.projector(inputs.output.hidden[self.block]), target, self.loss, self.beta)
