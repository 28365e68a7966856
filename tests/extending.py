"""The four worked examples of README "Extending igdit": a backbone family, a loss term with weights of its own, a
guidance rule and a time grid, each one class or function in this one file, used by an experiment YAML or the
command line through its import path (tests/test_extending.py runs them through the real CLI; nothing else in igdit
was edited for them)."""
from __future__ import annotations

import torch
import torch.nn as nn
from jsonargparse.typing import NonNegativeFloat, PositiveInt

from igdit.config import ConfigError, UnitInterval
from igdit.guidance import GuidanceRule, internal_guidance
from igdit.models import Backbone
from igdit.models.layers import FinalLayer, LabelEmbedder, SiTBlock, TimestepEmbedder
from igdit.objectives import Frozen, LossTerm, per_sample_loss


class ToyDiT(Backbone):
    """A backbone family: SiT's blocks with a learned position embedding, in two sizes (t = 1 is noise)."""

    family = "ToyDiT"
    sizes = {"S/2": dict(depth=4, hidden_size=64, num_heads=4, patch_size=2),
             "M/2": dict(depth=6, hidden_size=96, num_heads=4, patch_size=2)}

    def __init__(self, size: str = "S/2", *, input_size: PositiveInt = 8, in_channels: PositiveInt = 1,
                 num_classes: PositiveInt = 10, exits: list[int] = ()):
        super().__init__()
        self.configure(size, input_size=input_size, in_channels=in_channels, num_classes=num_classes, exits=exits)
        self.out_channels = in_channels
        d, p = self.hidden_size, self.patch_size
        self.x_embedder = nn.Conv2d(in_channels, d, p, stride=p)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, self.grid_size ** 2, d))
        self.t_embedder, self.y_embedder = TimestepEmbedder(d), LabelEmbedder(num_classes, d)
        self.blocks = nn.ModuleList([SiTBlock(d, self.num_heads) for _ in range(self.depth)])
        self.add_heads()  # an exit head per exit, then final_layer, each from make_head

    def make_head(self):
        return FinalLayer(self.hidden_size, self.patch_size, self.out_channels)

    def embed(self, x, t, y):
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        return tokens, self.t_embedder(t) + self.y_embedder(y)


class ProjectedAlignment(LossTerm):
    """A loss term with a projector of its own: block ``block``'s tokens, projected, regress a frozen random
    projection of the clean image's patches (the shape of REPA and Self-Transcendence: trained weights plus a
    frozen network)."""

    def __init__(self, weight: NonNegativeFloat = 0.1, block: PositiveInt = 1, features: PositiveInt = 8, **kwargs):
        super().__init__(weight=weight, **kwargs)  # start_step, stop_step, t_range, t_range_mode: LossTerm's
        self.block, self.features = block, features

    def attach(self, backbone, transport) -> None:
        super().attach(backbone, transport)
        if self.block > backbone.depth:
            raise ConfigError(self.field("block"), self.block, f"expected a block in [1, {backbone.depth}]")
        self.patch = backbone.patch_size
        self.projector = nn.Sequential(nn.Linear(backbone.hidden_size, 64), nn.SiLU(), nn.Linear(64, self.features))
        generator = torch.Generator().manual_seed(0)
        encoder = nn.Linear(backbone.in_channels * self.patch ** 2, self.features)
        with torch.no_grad():
            encoder.weight.copy_(torch.randn(encoder.weight.shape, generator=generator))
        self.encoder = Frozen(encoder, source="random projection, seed 0", digest="seed-0")

    def frozen_networks(self) -> dict:
        return {"encoder": self.encoder.describe()}

    def hidden_needed(self, step):
        return (self.block,)

    def per_sample(self, inputs):
        p = self.patch
        patches = inputs.x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
        target = self.encoder.get(patches.device)(patches)
        return per_sample_loss(self.projector(inputs.output.hidden[self.block]), target)


class RampedInternalGuidance(GuidanceRule):
    """A guidance rule: Internal Guidance whose scale ramps with the noise level, w(t) = 1 + (w - 1) t, so it
    acts most at high noise and not at all at t = 0. Acts inside each branch, in IG's place."""

    key = "ig_ramp"
    order = 10

    def __init__(self, scale: NonNegativeFloat = 1.0, interval: UnitInterval = (0.0, 1.0)):
        super().__init__(scale, interval)

    def prepare(self, backbone) -> None:
        if self.scale != 1.0 and not backbone.exit_indices:
            raise ConfigError("guidance.ig_ramp.scale", self.scale, "needs an exit head")
        self.exit = backbone.exit_indices[0] if backbone.exit_indices else None

    def exits_needed(self):
        return (self.exit,)

    def apply(self, v, output, run, t):
        return internal_guidance(v, output.exits[self.exit], 1 + (self.scale - 1) * t)


def cosine_grid(steps: int) -> list[float]:
    """A time grid: t = cos(pi/2 u) over u = linspace(0, 1, steps + 1), descending from 1 to 0 (small steps near the
    noise, large ones near the data)."""
    import math

    grid = [math.cos(math.pi / 2 * i / steps) for i in range(steps + 1)]
    grid[-1] = 0.0
    return grid
