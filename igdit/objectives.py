"""Training objectives as a weighted sum of terms (DESIGN.md contract 3).

Each term has a weight, an optional schedule (start/stop step, t-range) and declares which exit heads
and hidden states it needs; the LightningModule asks the backbone for exactly those. Adding a method
(Self-Transcendence, REPA, ...) is adding a term here, not subclassing the module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from igdit.config import ConfigError, check_choice, check_interval, check_number
from igdit.models.output import DiTOutput

LOSS_TYPES = ("mse", "smooth_l1", "l1")


@dataclass
class LossInputs:
    """Everything a term may read for one training batch (t = 1 is noise).

    x, noise, x_t, target: (N, C, H, W) clean latents, noise, noisy latents, velocity target.
    t: (N,) times; y: (N,) labels (num_classes = null); output: the backbone's DiTOutput; step: global step.
    """

    x: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    x_t: torch.Tensor
    target: torch.Tensor
    y: torch.Tensor
    output: DiTOutput
    step: int


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse", beta: float = 0.05) -> torch.Tensor:
    """Elementwise loss averaged over all but the batch dimension: (N, ...) -> (N,), in float32."""
    pred, target = pred.float(), target.float()
    if kind == "mse":
        err = (pred - target) ** 2
    elif kind == "l1":
        err = (pred - target).abs()
    else:
        err = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    return err.flatten(1).mean(1)


@dataclass
class TermSchedule:
    """When a term counts: global steps in [start_step, stop_step) and samples with t in t_range."""

    weight: float = 1.0
    start_step: int = 0
    stop_step: Optional[int] = None
    t_range: tuple[float, float] = (0.0, 1.0)

    def validate(self, field: str) -> None:
        check_number(f"{field}.weight", self.weight, low=0)
        check_number(f"{field}.start_step", self.start_step, low=0, integer=True)
        if self.stop_step is not None:
            check_number(f"{field}.stop_step", self.stop_step, low=self.start_step + 1, integer=True)
        self.t_range = check_interval(f"{field}.t_range", self.t_range)

    def active(self, step: int) -> bool:
        return self.weight > 0 and step >= self.start_step and (self.stop_step is None or step < self.stop_step)


@dataclass
class DiffusionLossConfig(TermSchedule):
    """The flow-matching loss on the final head: || v_final - v_target ||^2 by default."""

    loss: str = "mse"
    beta: float = 0.05  # smooth-L1 transition point


@dataclass
class ExitLossConfig(TermSchedule):
    """The Internal Guidance exit loss: each exit head regresses the same velocity target.

    weight 0.5 as the official code (hard-coded there; the paper reports lambda <= 0.5 works).
    The official code computes MSE (its --loss-type flag is never read); smooth_l1 (beta) and l1 are options.
    With several exits the term is their mean, so the weight means the same for any number of heads.
    """

    weight: float = 0.5
    loss: str = "mse"
    beta: float = 0.05


class LossTerm:
    """One weighted, scheduled term. Subclasses say what they need and compute a per-sample loss."""

    name = "term"

    def __init__(self, config: TermSchedule, field: str):
        config.validate(field)
        self.config = config

    @property
    def exits_needed(self) -> tuple[int, ...]:
        return ()

    @property
    def hidden_needed(self) -> tuple[int, ...]:
        return ()

    def per_sample(self, inputs: LossInputs) -> torch.Tensor:
        """(N,) loss of each sample."""
        raise NotImplementedError

    def __call__(self, inputs: LossInputs) -> torch.Tensor:
        """Unweighted scalar: the batch mean, with samples outside t_range counted as zero."""
        losses = self.per_sample(inputs)
        low, high = self.config.t_range
        if (low, high) != (0.0, 1.0):
            losses = losses * ((inputs.t >= low) & (inputs.t <= high)).to(losses.dtype)
        return losses.mean()


class DiffusionLoss(LossTerm):
    name = "diffusion"

    def __init__(self, config: DiffusionLossConfig, field: str = "model.diffusion_loss"):
        super().__init__(config, field)
        check_choice(f"{field}.loss", config.loss, LOSS_TYPES)
        check_number(f"{field}.beta", config.beta, low=0, low_inclusive=False)

    def per_sample(self, inputs: LossInputs) -> torch.Tensor:
        c = self.config
        return per_sample_loss(inputs.output.final, inputs.target, c.loss, c.beta)


class ExitLoss(LossTerm):
    name = "ig_exit"

    def __init__(self, config: ExitLossConfig, exits: tuple[int, ...], field: str = "model.exit_loss"):
        super().__init__(config, field)
        check_choice(f"{field}.loss", config.loss, LOSS_TYPES)
        check_number(f"{field}.beta", config.beta, low=0, low_inclusive=False)
        if config.weight > 0 and not exits:
            raise ConfigError(f"{field}.weight", config.weight, "needs at least one exit in model.exits (or set it to 0)")
        self.exits = tuple(exits)

    @property
    def exits_needed(self) -> tuple[int, ...]:
        return self.exits

    def per_sample(self, inputs: LossInputs) -> torch.Tensor:
        c = self.config
        per_exit = [per_sample_loss(inputs.output.exits[i], inputs.target, c.loss, c.beta) for i in self.exits]
        return torch.stack(per_exit).mean(0)


class Objective:
    """The training loss: sum over active terms of weight * term. Logs each term's unweighted value."""

    def __init__(self, terms: list[LossTerm]):
        names = [term.name for term in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"loss term names must be unique, got {names}")
        self.terms = terms

    def active_terms(self, step: int) -> list[LossTerm]:
        return [term for term in self.terms if term.config.active(step)]

    def exits_needed(self, step: int) -> tuple[int, ...]:
        """Exit heads the backbone must run at this step (none when no active term reads them)."""
        return tuple(sorted({i for term in self.active_terms(step) for i in term.exits_needed}))

    def hidden_needed(self, step: int) -> tuple[int, ...]:
        return tuple(sorted({i for term in self.active_terms(step) for i in term.hidden_needed}))

    def __call__(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (weighted total, {term name: unweighted value}) for the active terms."""
        active = self.active_terms(inputs.step)
        if not active:
            raise RuntimeError(f"no loss term is active at step {inputs.step}")
        values = {term.name: term(inputs) for term in active}
        total = sum(term.config.weight * values[term.name] for term in active)
        return total, values
