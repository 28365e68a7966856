"""Guidance rules composed around a backbone (DESIGN.md contract 4).

The denoiser turns one backbone into the velocity a sampler integrates. Rules are applied in one
documented order: **Internal Guidance inside each conditioning branch, then CFG across branches**.
Every interval is written in the project's time convention (t = 1 is noise) and is inclusive at both
ends, as in the official code (`low <= t <= high`). Outside its interval a rule costs nothing: the exit
head runs only on steps inside the IG interval, the batch is doubled only on steps inside the CFG one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from igdit.config import check_interval, check_number


def internal_guidance(v_final: torch.Tensor, v_exit: torch.Tensor, scale: float) -> torch.Tensor:
    """The IG rule: extrapolate from the weak (exit) prediction through the strong (final) one.

    v = v_exit + w * (v_final - v_exit); w = 1 returns v_final exactly. Shapes (N, C, H, W).
    """
    if scale == 1.0:
        return v_final
    return v_exit + scale * (v_final - v_exit)


def classifier_free_guidance(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG on all latent channels: v = v_u + s (v_c - v_u); s = 1 returns v_cond exactly."""
    if scale == 1.0:
        return v_cond
    return v_uncond + scale * (v_cond - v_uncond)


@dataclass
class GuidanceRule:
    """A scale and the t-interval [low, high] (inclusive, t = 1 noise) where the scale applies."""

    scale: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)

    def validate(self, field: str) -> "GuidanceRule":
        check_number(f"{field}.scale", self.scale, low=0)
        self.interval = check_interval(f"{field}.interval", self.interval)
        return self

    def active(self, t: float) -> bool:
        """True when the rule changes the output at time t (scale != 1 and t inside the interval)."""
        low, high = self.interval
        return self.scale != 1.0 and low <= t <= high


class Denoiser:
    """backbone ∘ guidance: call with (x (N,C,H,W), t: float in [0,1], y (N,) labels) -> velocity (N,C,H,W).

    ig: Internal Guidance with the backbone's exit head `ig_exit` (the first exit by default).
    cfg: classifier-free guidance against the null label (`backbone.num_classes`).
    Each call is exactly one backbone forward pass (on a doubled batch inside the CFG interval), so a
    sampler's count of calls is its NFE.
    """

    def __init__(self, backbone, ig: GuidanceRule | None = None, cfg: GuidanceRule | None = None,
                 ig_exit: int | None = None):
        self.backbone = backbone
        self.ig = (ig or GuidanceRule()).validate("guidance.ig")
        self.cfg = (cfg or GuidanceRule()).validate("guidance.cfg")
        exits = tuple(getattr(backbone, "exit_indices", ()))
        self.ig_exit = ig_exit if ig_exit is not None else (exits[0] if exits else None)
        if self.ig.scale != 1.0 and self.ig_exit not in exits:
            raise ValueError(f"guidance.ig.scale: {self.ig.scale} needs an exit head; the model has exits {list(exits)}")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: float, y: torch.Tensor) -> torch.Tensor:
        use_ig, use_cfg = self.ig.active(t), self.cfg.active(t)
        if use_cfg:
            null = torch.full_like(y, self.backbone.num_classes)
            x, y = torch.cat([x, x]), torch.cat([y, null])
        t_batch = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
        exits = (self.ig_exit,) if use_ig else ()
        out = self.backbone(x, t_batch, y, exits=exits)
        v = internal_guidance(out.final, out.exits[self.ig_exit], self.ig.scale) if use_ig else out.final
        if use_cfg:
            v_cond, v_uncond = v.chunk(2)
            v = classifier_free_guidance(v_cond, v_uncond, self.cfg.scale)
        return v
