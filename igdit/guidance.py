"""Guidance rules composed around a backbone (DESIGN.md contract 4). The IG rule lives here.

The denoiser turns a backbone into the velocity a sampler integrates. Rules apply in one documented order:

  1. one forward pass on the batch (on [x; x] with labels [y; null] while CFG is active);
  2. **Internal Guidance inside each branch**: v = v_exit + w_ig (v_final - v_exit);
  3. **Autoguidance inside each branch**: v = v_guide + w_ag (v - v_guide), v_guide from a weaker
     checkpoint with the same conditioning (edm2's `gnet.lerp(net, w)`);
  4. **CFG across branches**: v = v_u + s (v_c - v_u), on all latent channels.

Guidance acts on the velocity; an SDE sampler forms its drift from the guided velocity (everything is
affine in v, so this equals the public SiT code's guidance of the drift). Intervals are in the project's
time (t = 1 is noise) and inclusive at both ends, as in the official code (`low <= t <= high`). Outside
its interval a rule costs nothing: the exit head runs only inside the IG interval, the guide network
only inside the Autoguidance interval, and the batch is doubled only inside the CFG interval.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from igdit.config import ConfigError, check_interval, check_number


def internal_guidance(v_final: torch.Tensor, v_exit: torch.Tensor, scale: float) -> torch.Tensor:
    """The IG rule: extrapolate from the weak (exit) prediction through the strong (final) one.

    v = v_exit + w * (v_final - v_exit); w = 1 returns v_final exactly. Shapes (N, C, H, W).
    """
    if scale == 1.0:
        return v_final
    return v_exit + scale * (v_final - v_exit)


def autoguidance(v_main: torch.Tensor, v_guide: torch.Tensor, scale: float) -> torch.Tensor:
    """Autoguidance (Karras et al. 2024): v = v_guide + w (v_main - v_guide); w = 1 returns v_main."""
    if scale == 1.0:
        return v_main
    return v_guide + scale * (v_main - v_guide)


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

    ig: Internal Guidance with the backbone's exit head `ig_exit` (its first exit by default).
    cfg: classifier-free guidance against the null label (`backbone.num_classes`).
    autoguidance + guide: Autoguidance against a second, weaker backbone with the same classes and shape.
    Cost accounting: `network_passes` counts forward calls of any network (main and guide) and
    `network_rows` the samples pushed through them, so a doubled CFG batch costs twice the rows.
    """

    def __init__(self, backbone, ig: GuidanceRule | None = None, cfg: GuidanceRule | None = None,
                 autoguidance: GuidanceRule | None = None, guide=None, ig_exit: int | None = None):
        self.backbone, self.guide = backbone, guide
        self.ig = (ig or GuidanceRule()).validate("guidance.ig")
        self.cfg = (cfg or GuidanceRule()).validate("guidance.cfg")
        self.ag = (autoguidance or GuidanceRule()).validate("guidance.autoguidance")
        exits = tuple(getattr(backbone, "exit_indices", ()))
        self.ig_exit = ig_exit if ig_exit is not None else (exits[0] if exits else None)
        if self.ig.scale != 1.0 and self.ig_exit not in exits:
            raise ConfigError("guidance.ig.scale", self.ig.scale,
                              f"needs an exit head; this model has exits {list(exits)} (scale 1 turns IG off)")
        if self.ag.scale != 1.0:
            if guide is None:
                raise ConfigError("guidance.autoguidance.scale", self.ag.scale, "needs a guide checkpoint")
            for name in ("num_classes", "in_channels", "input_size"):
                if getattr(guide, name) != getattr(backbone, name):
                    raise ConfigError(f"guidance.autoguidance.{name}", getattr(guide, name),
                                      f"the guide must match the main model's {name} {getattr(backbone, name)}")
        self.network_passes = 0
        self.network_rows = 0

    def _forward(self, net, x, t_batch, y, exits=()):
        self.network_passes += 1
        self.network_rows += x.shape[0]
        return net(x, t_batch, y, exits=exits)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: float, y: torch.Tensor) -> torch.Tensor:
        use_ig, use_cfg, use_ag = self.ig.active(t), self.cfg.active(t), self.ag.active(t)
        if use_cfg:
            null = torch.full_like(y, self.backbone.num_classes)
            x, y = torch.cat([x, x]), torch.cat([y, null])
        t_batch = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
        out = self._forward(self.backbone, x, t_batch, y, exits=(self.ig_exit,) if use_ig else ())
        v = internal_guidance(out.final, out.exits[self.ig_exit], self.ig.scale) if use_ig else out.final
        if use_ag:
            v = autoguidance(v, self._forward(self.guide, x, t_batch, y).final, self.ag.scale)
        if use_cfg:
            v_cond, v_uncond = v.chunk(2)
            v = classifier_free_guidance(v_cond, v_uncond, self.cfg.scale)
        return v


SETTING_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # what MLflow accepts inside a metric name
SETTING_RULES = ("ig", "cfg")


@dataclass
class GuidanceSetting:
    """A named guidance configuration to evaluate, e.g. ``ig: {scale: 1.4}, cfg: {scale: 1.35, interval: [0, 0.7]}``."""

    ig: GuidanceRule = field(default_factory=GuidanceRule)
    cfg: GuidanceRule = field(default_factory=GuidanceRule)

    def denoiser(self, backbone, ig_exit: int | None = None) -> Denoiser:
        return Denoiser(backbone, ig=self.ig, cfg=self.cfg, ig_exit=ig_exit)

    def describe(self) -> dict:
        """Plain values for logs: {"ig": {"scale": w, "interval": [lo, hi]}, "cfg": {...}}."""
        return {name: {"scale": rule.scale, "interval": list(rule.interval)}
                for name, rule in (("ig", self.ig), ("cfg", self.cfg))}


def parse_guidance_settings(settings: Any, field: str) -> dict[str, GuidanceSetting]:
    """Validate ``{name: {"ig": {"scale", "interval"}, "cfg": {...}}}`` (omitted rules are off).

    Names become metric names (``fd_digits/<name>``), so they may hold letters, digits, ``_ . -`` only.
    """
    if not isinstance(settings, dict) or not settings:
        raise ConfigError(field, settings, "expected a mapping of setting names to {ig: {...}, cfg: {...}}, "
                                           "e.g. {none: {}, ig: {ig: {scale: 2.0}}}")
    parsed = {}
    for name, rules in settings.items():
        if not isinstance(name, str) or not SETTING_NAME.match(name):
            raise ConfigError(field, name, "setting names may hold letters, digits, '_', '.' and '-' only "
                                           "(they become MLflow metric names)")
        rules = {} if rules is None else rules
        if not isinstance(rules, dict) or set(rules) - set(SETTING_RULES):
            raise ConfigError(f"{field}.{name}", rules, "expected a mapping with the keys ig and/or cfg")
        built = {}
        for rule in SETTING_RULES:
            spec = rules.get(rule) or {}
            if not isinstance(spec, dict) or set(spec) - {"scale", "interval"}:
                raise ConfigError(f"{field}.{name}.{rule}", spec, "expected {scale: <number>, interval: [low, high]}")
            built[rule] = GuidanceRule(spec.get("scale", 1.0), spec.get("interval", (0.0, 1.0))).validate(
                f"{field}.{name}.{rule}")
        parsed[name] = GuidanceSetting(**built)
    return parsed
