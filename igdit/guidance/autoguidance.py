"""Autoguidance (Karras et al., NeurIPS 2024): guide with a weaker (smaller and/or less trained) network of the
same conditioning, v = v_guide + w (v - v_guide), edm2's ``gnet.lerp(net, w)``."""
from __future__ import annotations

from typing import Literal

import torch
from jsonargparse.typing import NonNegativeFloat

from igdit.config import ConfigError, UnitInterval
from igdit.guidance.base import GuidanceRule, extrapolate

_GUIDES: dict[tuple, object] = {}  # (path, weights, device) -> guide backbone: loaded once per process


def autoguidance(v_main: torch.Tensor, v_guide: torch.Tensor, scale: float) -> torch.Tensor:
    """v = v_guide + w (v_main - v_guide); w = 1 returns v_main."""
    return extrapolate(v_guide, v_main, scale)


class Autoguidance(GuidanceRule):
    """Autoguidance inside each branch, after IG, with the guide network from the igdit checkpoint ``ckpt``
    (its EMA weights, or ``weights: raw``). The guide runs only while the rule is active."""

    key = "ag"
    order = 20

    def __init__(self, scale: NonNegativeFloat = 1.0, interval: UnitInterval = (0.0, 1.0), ckpt: str = "",
                 weights: Literal["ema", "raw"] = "ema"):
        super().__init__(scale, interval)
        self.ckpt, self.weights = ckpt, weights
        self.guide = None

    def use_guide(self, guide) -> "Autoguidance":
        """Guide with a network already in memory instead of loading ``ckpt``."""
        self.guide = guide
        return self

    def prepare(self, backbone) -> None:
        if self.scale == 1.0:
            return
        if self.guide is None:
            if not self.ckpt:
                raise ConfigError("guidance.ag.ckpt", self.ckpt, "Autoguidance needs a guide: the igdit checkpoint "
                                                                 "of a weaker model (smaller or earlier)")
            device = next(backbone.parameters()).device
            key = (self.ckpt, self.weights, str(device))
            if key not in _GUIDES:
                # imported here, not at the top: the models import timm (and with it torchvision), over a second
                # that `igdit sample --help` and every other user of the guidance rules would pay for nothing
                from igdit.models.loading import load_backbone

                _GUIDES[key] = load_backbone(self.ckpt, "guidance.ag.ckpt", device, weights=self.weights)
            self.guide = _GUIDES[key]
        for name in ("num_classes", "latent_shape"):
            if getattr(self.guide, name) != getattr(backbone, name):
                raise ConfigError("guidance.ag.ckpt", self.ckpt, f"the guide's {name} {getattr(self.guide, name)} "
                                  f"differs from the main model's {getattr(backbone, name)}")

    def apply(self, v: torch.Tensor, output, run, t: float) -> torch.Tensor:
        return autoguidance(v, run(self.guide).final, self.scale)

    def describe(self) -> dict:
        return super().describe() | {"ckpt": self.ckpt, "weights": self.weights}
