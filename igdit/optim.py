"""Optimisers and learning-rate schedules igdit adds to torch's (the experiment chooses by ``class_path``)."""
from __future__ import annotations

import torch
from jsonargparse.typing import PositiveInt


class LinearWarmup(torch.optim.lr_scheduler.LambdaLR):
    """lr x min(1, (step + 1) / warmup_steps): a linear ramp over the first warmup_steps optimiser steps, then
    constant (the SiT/REPA recipes use none; the digits default warms up for 100 steps). torch's LinearLR
    says the same with start_factor 1 / warmup_steps and total_iters warmup_steps - 1."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: PositiveInt = 1):
        self.warmup_steps = int(warmup_steps)
        super().__init__(optimizer, lambda step: min(1.0, (step + 1) / self.warmup_steps))
