"""What every loss term is and how terms add up (DESIGN.md contract 3).

The training loss is a weighted sum of terms. A term is an ``nn.Module`` injected from the experiment YAML by
``class_path`` under a name (``model.terms.<name>``): its own layers (a projector) are trained, averaged by EMA
and saved with the model; a network it only reads (a teacher, an external encoder) is held in a ``Frozen``
box, so it is neither trained, nor averaged, nor written into checkpoints. Each term has a weight and a
schedule (start/stop step, t-range) and says which exit heads and hidden states it reads; the LightningModule
asks the backbone for exactly those.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveInt

from igdit.config import ConfigError, UnitInterval, check_interval
from igdit.models.output import DiTOutput

LossType = Literal["mse", "smooth_l1", "l1"]


@dataclass
class LossInputs:
    """Everything a term may read for one training batch (t = 1 is noise).

    x, noise, x_t, target: (N, C, H, W) clean latents, noise, noisy latents, velocity target.
    t: (N,) times; y: (N,) labels the backbone saw (class dropout applied, num_classes = null);
    y_clean: (N,) labels before class dropout; output: the backbone's DiTOutput; step: global step;
    backbone, transport: the model being trained and its path (for terms that run it again, e.g. at another t).
    """

    x: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    x_t: torch.Tensor
    target: torch.Tensor
    y: torch.Tensor
    y_clean: torch.Tensor
    output: DiTOutput
    step: int
    backbone: Any = None
    transport: Any = None


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


class Frozen:
    """A network a term reads but never trains (a teacher, an external encoder).

    Not a submodule: the optimiser, the EMA copy and checkpoints do not see it. ``deepcopy`` (what the EMA
    callback does to the LightningModule) shares the box instead of copying the network. ``get(device)``
    moves it to where the batch is, once.
    """

    def __init__(self, net: nn.Module, source: str, digest: str):
        self.net = net.eval().requires_grad_(False)
        self.source, self.digest = source, digest

    def __deepcopy__(self, memo) -> "Frozen":
        return self

    def get(self, device: torch.device) -> nn.Module:
        if next(self.net.parameters(), torch.empty(0)).device != device:
            self.net.to(device)
        return self.net

    def describe(self) -> dict:
        return {"source": self.source, "sha256": self.digest}


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (what a frozen network was loaded from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class LossTerm(nn.Module):
    """One weighted, scheduled loss term.

    weight: its factor in the total (0 switches it off). start_step, stop_step: it counts for global steps in
    [start_step, stop_step). t_range: samples with t outside [low, high] count as zero (t = 1 is noise).
    Subclasses say what they read (``exits_needed``, ``hidden_needed``), may build layers of their own in
    ``attach`` (called once with the backbone, before the optimiser and the EMA copy exist) and compute a
    per-sample loss (or override ``forward`` for a batch-level term). ``name`` is the key the experiment gives
    the term (``model.terms.<name>``); it is logged as ``train/<name>``.
    """

    def __init__(self, weight: NonNegativeFloat = 1.0, start_step: NonNegativeInt = 0,
                 stop_step: Optional[PositiveInt] = None, t_range: UnitInterval = (0.0, 1.0)):
        super().__init__()
        self.name = type(self).__name__  # the key the experiment gives it, once the Objective holds it
        self.weight, self.start_step, self.stop_step = float(weight), int(start_step), stop_step
        self.t_range = tuple(t_range)
        self.logged: dict[str, torch.Tensor] = {}  # extra values a term reports (logged as train/<name>/<key>)

    def field(self, key: str) -> str:
        """The config path of one of this term's fields, for error messages."""
        return f"model.terms.{self.name}.{key}"

    def attach(self, backbone, transport) -> None:
        """Check the term's fields together and that the backbone offers what the term reads; build the term's
        own layers. Subclasses that override it call ``super().attach`` first."""
        self.t_range = check_interval(self.field("t_range"), self.t_range)
        if self.stop_step is not None and self.stop_step <= self.start_step:
            raise ConfigError(self.field("stop_step"), self.stop_step, f"must be greater than start_step {self.start_step}")

    def check_block(self, key: str, backbone) -> int:
        """The field ``key`` (a 1-based block index the term reads) if ``backbone`` has that block; else a
        one-line ConfigError naming the field and the blocks there are."""
        block = getattr(self, key)
        if not 1 <= block <= backbone.depth:
            raise ConfigError(self.field(key), block, f"blocks are 1-based indices in [1, {backbone.depth}] for "
                                                      f"{backbone.name} (depth {backbone.depth})")
        return block

    def setup(self, device: torch.device) -> None:
        """Before training: load what the term reads from disk (a frozen teacher) and check it. Default: nothing."""

    def frozen_networks(self) -> dict[str, dict]:
        """Source and content hash of each frozen network the term reads (recorded in the hyper-parameters)."""
        return {}

    def active(self, step: int) -> bool:
        return self.weight > 0 and step >= self.start_step and (self.stop_step is None or step < self.stop_step)

    def exits_needed(self, step: int) -> tuple[int, ...]:
        return ()

    def hidden_needed(self, step: int) -> tuple[int, ...]:
        return ()

    def per_sample(self, inputs: LossInputs) -> torch.Tensor:
        """(N,) loss of each sample."""
        raise NotImplementedError

    def in_t_range(self, t: torch.Tensor) -> torch.Tensor:
        """(N,) bool: samples whose t lies in t_range."""
        low, high = self.t_range
        return (t >= low) & (t <= high)

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        """Unweighted scalar: the batch mean, with samples outside t_range counted as zero."""
        losses = self.per_sample(inputs)
        if self.t_range != (0.0, 1.0):
            losses = losses * self.in_t_range(inputs.t).to(losses.dtype)
        return losses.mean()


class Objective(nn.ModuleDict):
    """The training loss: the sum over active terms of weight x term, terms keyed by their names."""

    def __init__(self, terms: dict[str, LossTerm]):
        for name, term in terms.items():
            if not name.isidentifier():
                raise ConfigError("model.terms", name, "term names are identifiers (letters, digits, '_'); they "
                                                       "name the term's weights and its logged value")
            term.name = name
        super().__init__(terms)

    def attach(self, backbone, transport) -> None:
        for term in self.values():
            term.attach(backbone, transport)

    def active_terms(self, step: int) -> list[LossTerm]:
        return [term for term in self.values() if term.active(step)]

    def exits_needed(self, step: int) -> tuple[int, ...]:
        """Exit heads the backbone must run at this step (none when no active term reads them)."""
        return tuple(sorted({i for term in self.active_terms(step) for i in term.exits_needed(step)}))

    def hidden_needed(self, step: int) -> tuple[int, ...]:
        return tuple(sorted({i for term in self.active_terms(step) for i in term.hidden_needed(step)}))

    def forward(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (weighted total, {name: unweighted value, name/key: a term's extra logged values})."""
        active = self.active_terms(inputs.step)
        if not active:
            raise RuntimeError(f"no loss term is active at step {inputs.step}")
        values = {}
        for term in active:
            term.logged = {}
            values[term.name] = term(inputs)
            values.update({f"{term.name}/{key}": value for key, value in term.logged.items()})
        total = sum(term.weight * values[term.name] for term in active)
        return total, values
