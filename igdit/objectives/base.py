"""What every loss term is and how terms add up (docs/design.md, contract 3).

The training loss is a weighted sum of terms. A term is an ``nn.Module`` injected from the experiment YAML by
``class_path`` under a name (``model.terms.<name>``): its own layers (a projector) are trained, averaged by EMA
and saved with the model; a network it only reads (a teacher, an external encoder) is held in a ``Frozen``
box, so it is neither trained, nor averaged, nor written into checkpoints. Each term has a weight and a
schedule (start/stop step, t-range) and says which exit heads and hidden states it reads; the LightningModule
asks the backbone for exactly those.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveInt

from igdit.config import ConfigError, UnitInterval, check_interval
from igdit.data.encoders import decode_latents
from igdit.models.output import DiTOutput

LossType = Literal["mse", "smooth_l1", "l1"]
# How a t_range counts (see LossTerm): the per-sample mask, or what the public Self-Transcendence code computes.
TRangeMode = Literal["per_sample", "official_broadcast"]


@dataclasses.dataclass
class LossInputs:
    """Everything a term may read for one training batch (t = 1 is noise).

    x, noise, x_t, target: (N, C, H, W) clean latents, noise, noisy latents, velocity target.
    t: (N,) times; y: (N,) labels the backbone saw (class dropout applied, num_classes = null);
    y_clean: (N,) labels before class dropout; output: the backbone's DiTOutput; step: global step;
    backbone, transport: the model being trained and its path (for terms that run it again, e.g. at another t).
    ema_backbone: the backbone with the EMA weights that Lightning's EMAWeightAveraging keeps (a teacher that
        is never trained); None without a trainer or without that callback.
    data_meta: the shards' meta.json (encoder and normaliser), from which ``images()`` decodes x.
    generator: the RNG of this batch's t and noise (validation fixes it); terms that draw more use it too.
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
    ema_backbone: Any = None
    data_meta: Optional[dict] = None
    generator: Optional[torch.Generator] = None
    _images: Optional[torch.Tensor] = dataclasses.field(default=None, init=False, repr=False)

    def images(self) -> torch.Tensor:
        """(N, C, H, W) clean images in [-1, 1]: x decoded once per batch with the shards' own normaliser and
        encoder (``data_meta``), without gradient.

        Pixel-space data (the identity encoder; or no meta) costs nothing: the images are x. VAE latents cost one
        decoder pass per sample and step (SD-VAE, 32x32x4 -> 256x256: 622 GFLOPs, 4.5x an SiT-B/2 training step of
        138 GFLOPs per image and 0.87x an SiT-XL/2 step), and they are reconstructions, not the original pixels
        REPA's data loader reads. NOTE: a run at scale should store the images (or the encoder's features) in the
        shards and pass them in instead of decoding.
        """
        if self._images is None:
            with torch.no_grad():
                self._images = decode_latents(self.x, self.data_meta)
        return self._images


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


def check_block(field: str, block: Any, depth: int) -> int:
    """A 1-based block index in [1, depth] (the hidden state after that block), or a one-line ConfigError."""
    if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= depth:
        raise ConfigError(field, block, f"blocks are 1-based indices in [1, {depth}] for a backbone of depth {depth}")
    return block


def mlp(*widths: int) -> nn.Sequential:
    """Linear layers of the given widths with SiLU between them (the projectors of REPA, SRA and ST), initialised
    as the reference code initialises every Linear of its SiT: xavier-uniform weights, zero biases."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        linear = nn.Linear(fan_in, fan_out)
        nn.init.xavier_uniform_(linear.weight)
        nn.init.zeros_(linear.bias)
        layers += [linear] if i == len(widths) - 2 else [linear, nn.SiLU()]
    return nn.Sequential(*layers)


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
    [start_step, stop_step). t_range: where in t (t = 1 is noise) the term acts, counted by t_range_mode:
    ``per_sample`` (default): samples with t outside [low, high] count as zero in the batch mean;
    ``official_broadcast``: the batch mean over *every* sample times the fraction of the batch inside the range.
    The second is what the public Self-Transcendence code computes (``mean_flat(loss) * t_mask`` with shapes (B,)
    and (B, 1, 1, 1) broadcasts to (B, 1, 1, B)), so its published numbers come from an alignment that acts at
    every t, scaled by the in-range fraction; the first is what that code evidently meant.
    Subclasses declare only their own fields and the defaults they change, and pass the rest on (``**kwargs``):
    the CLI lists and type-checks these four fields for every term.
    Subclasses say what they read (``exits_needed``, ``hidden_needed``), may build layers of their own in
    ``attach`` (called once with the backbone, before the optimiser and the EMA copy exist) and compute a
    per-sample loss (or override ``forward`` for a batch-level term). ``name`` is the key the experiment gives
    the term (``model.terms.<name>``); it is logged as ``train/<name>``. A term whose teacher is the EMA model
    sets ``reads_ema``: the module then refuses to fit without Lightning's EMAWeightAveraging callback.
    """

    reads_ema: ClassVar[bool] = False

    def __init__(self, weight: NonNegativeFloat = 1.0, start_step: NonNegativeInt = 0,
                 stop_step: Optional[PositiveInt] = None, t_range: UnitInterval = (0.0, 1.0),
                 t_range_mode: TRangeMode = "per_sample"):
        super().__init__()
        self.name = type(self).__name__  # the key the experiment gives it, once the Objective holds it
        self.weight, self.start_step, self.stop_step = float(weight), int(start_step), stop_step
        self.t_range, self.t_range_mode = tuple(t_range), t_range_mode
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

    def setup(self, device: torch.device, datamodule=None) -> None:
        """Before training: load what the term reads from disk (a frozen teacher) and check it. ``datamodule``: the
        run's data (its shards and meta.json) when there is one, for networks trained on the data set itself.
        Default: nothing."""

    def frozen_networks(self) -> dict[str, dict]:
        """Source and content hash of each frozen network the term reads (recorded in the hyper-parameters)."""
        return {}

    def active(self, step: int) -> bool:
        return self.weight > 0 and step >= self.start_step and (self.stop_step is None or step < self.stop_step)

    def weight_at(self, step: int) -> float:
        """The term's factor in the total at a global step (``weight``; a term with a weight schedule overrides)."""
        return self.weight

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

    def counted(self, t: torch.Tensor) -> torch.Tensor:
        """(N,) bool: the samples whose loss enters the batch value: those inside t_range (``per_sample``), every
        sample (``official_broadcast``). A term that runs a network per sample runs it on these only."""
        if self.t_range_mode == "official_broadcast":
            return torch.ones_like(t, dtype=torch.bool)
        return self.in_t_range(t)

    def reduce(self, value: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The batch value from (N,) per-sample losses, or from a batch-level scalar already computed over the
        counted samples, under t_range and t_range_mode (see the class docstring)."""
        if self.t_range == (0.0, 1.0):
            return value.mean()
        inside = self.in_t_range(t)
        if self.t_range_mode == "official_broadcast":
            return value.mean() * inside.to(value.dtype).mean()
        return value.mean() if value.dim() == 0 else (value * inside.to(value.dtype)).mean()

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        """Unweighted scalar: the batch mean of ``per_sample`` under t_range (see ``reduce``)."""
        return self.reduce(self.per_sample(inputs), inputs.t)


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
        total = sum(term.weight_at(inputs.step) * values[term.name] for term in active)
        return total, values
