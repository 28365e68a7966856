"""Guidance as composition (docs/design.md, contract 4): a denoiser wraps a backbone with a list of rules.

The denoiser turns a backbone into the velocity a sampler integrates. Each rule has a scale and a t-interval
(inclusive at both ends, t = 1 noise, as the official code's ``low <= t <= high``) and says where it acts:

  * inside each conditioning branch (``acts = "branch"``): it changes the velocity of one forward pass, e.g.
    Internal Guidance (reads an exit head of the same pass) or Autoguidance (runs a guide network on the
    same input); branch rules apply in ``order`` (IG 10, then Autoguidance 20);
  * across branches (``acts = "across"``): it needs the batch doubled into [conditional; unconditional] and
    combines the two halves, e.g. CFG.

One call: decide which rules are active at the step's time -> one forward pass (on [x; x] with labels
[y; null] while an across rule is active, with the exit heads the active rules read) -> branch rules in order
-> the across rule. Outside its interval a rule costs nothing: the exit head runs only inside the IG interval,
the guide network only inside the Autoguidance interval, and the batch is doubled only inside the CFG interval.

A new rule is one file: a subclass with a ``key`` (its name in settings, command-line flags and sweep paths,
``guidance.<key>.<field>``), registered when its module is imported.
"""
from __future__ import annotations

import re
from typing import Any, Callable, ClassVar, Literal, Optional

import torch
from jsonargparse.typing import NonNegativeFloat

from igdit.config import ConfigError, UnitInterval, check_interval, instantiate

RULES: dict[str, type["GuidanceRule"]] = {}  # key -> rule class, filled by GuidanceRule.__init_subclass__


class GuidanceRule:
    """A scale and the t-interval [low, high] (inclusive, t = 1 noise) where the scale applies; scale 1 is off."""

    key: ClassVar[str] = ""
    acts: ClassVar[Literal["branch", "across"]] = "branch"
    order: ClassVar[int] = 50

    def __init__(self, scale: NonNegativeFloat = 1.0, interval: UnitInterval = (0.0, 1.0)):
        self.scale = float(scale)
        self.interval = check_interval(f"guidance.{self.key}.interval", interval)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.key:
            RULES[cls.key] = cls

    def active(self, t: float) -> bool:
        """True when the rule changes the output at time t (scale != 1 and t inside the interval)."""
        low, high = self.interval
        return self.scale != 1.0 and low <= t <= high

    def prepare(self, backbone) -> None:
        """Check that the backbone offers what the rule needs (and load what it reads); before any sampling."""

    def exits_needed(self) -> tuple[int, ...]:
        """Exit heads the main forward pass must run while the rule is active."""
        return ()

    def apply(self, v: torch.Tensor, output, run: Callable, t: float) -> torch.Tensor:
        """Branch rules: the guided velocity from v (N, C, H, W), the pass's DiTOutput, ``run(net, exits)``, which
        runs another network on the same x, t and labels (counted in the cost), and the time t (1 = noise)."""
        raise NotImplementedError

    def combine(self, v_cond: torch.Tensor, v_uncond: torch.Tensor) -> torch.Tensor:
        """Across rules: one velocity from the conditional and unconditional halves."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Plain values for logs and reports."""
        return {"scale": self.scale, "interval": list(self.interval)}


def extrapolate(weak: torch.Tensor, strong: torch.Tensor, scale: float) -> torch.Tensor:
    """weak + w (strong - weak): w = 1 returns ``strong`` exactly. Every rule here has this form."""
    if scale == 1.0:
        return strong
    return weak + scale * (strong - weak)


class Denoiser:
    """backbone ∘ guidance: ``denoiser(x (N, C, H, W), t: float in [0, 1], y (N,), decide_at=None)`` -> (N, C, H, W).

    rules: guidance rules (any order; they compose in the documented one). decide_at: the time at which the
    rules decide whether they act (the start of the sampler's step; default t).
    Cost accounting: ``network_passes`` counts forward calls of any network (main and guide) and
    ``network_rows`` the samples pushed through them, so a doubled CFG batch costs twice the rows.
    """

    def __init__(self, backbone, rules: list[GuidanceRule] = ()):
        self.backbone = backbone
        self.rules = sorted(rules, key=lambda rule: (rule.acts == "across", rule.order))
        keys = [rule.key for rule in self.rules]
        if len(set(keys)) != len(keys):
            raise ConfigError("guidance", keys, "each rule may appear once")
        if sum(rule.acts == "across" for rule in self.rules) > 1:
            raise ConfigError("guidance", keys, "at most one rule may combine conditioning branches")
        for rule in self.rules:
            rule.prepare(backbone)
        self.network_passes = 0
        self.network_rows = 0

    def _forward(self, net, x, t_batch, y, exits=()):
        self.network_passes += 1
        self.network_rows += x.shape[0]
        return net(x, t_batch, y, exits=exits)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: float, y: torch.Tensor, decide_at: Optional[float] = None) -> torch.Tensor:
        active = [rule for rule in self.rules if rule.active(t if decide_at is None else decide_at)]
        across = next((rule for rule in active if rule.acts == "across"), None)
        if across is not None:
            null = torch.full_like(y, self.backbone.num_classes)
            x, y = torch.cat([x, x]), torch.cat([y, null])
        t_batch = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
        exits = tuple(sorted({i for rule in active for i in rule.exits_needed()}))
        output = self._forward(self.backbone, x, t_batch, y, exits)
        run = lambda net, exits=(): self._forward(net, x, t_batch, y, exits)  # noqa: E731
        v = output.final
        for rule in active:
            if rule.acts == "branch":
                v = rule.apply(v, output, run, t)
        if across is not None:
            v = across.combine(*v.chunk(2))
        return v


# ---- settings: named lists of rules, as configs write them ---------------------------------------------
SETTING_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # what MLflow accepts inside a metric name


def rule_class(key: str, field: str) -> type[GuidanceRule]:
    """The rule registered as ``key``, or the GuidanceRule subclass at the import path ``key``."""
    if key in RULES:
        return RULES[key]
    if "." in key:
        from jsonargparse.typing import import_object

        try:
            cls = import_object(key)
        except Exception:
            cls = None
        if isinstance(cls, type) and issubclass(cls, GuidanceRule):
            return cls
    raise ConfigError(field, key, "choose a guidance rule: " + ", ".join(RULES) + " or the import path of a "
                                  "GuidanceRule subclass")


def build_rules(spec: Any, field: str) -> list[GuidanceRule]:
    """``{rule: {init args}}`` (rule: a registered key such as ig, cfg, ag, or an import path) -> rules, each
    type-checked as the CLI checks a config. Rules at scale 1 are kept (they cost nothing)."""
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        raise ConfigError(field, spec, "expected a mapping of rules to their fields, e.g. {ig: {scale: 2.0}}")
    rules = []
    for key, args in spec.items():
        cls = rule_class(key, f"{field}.{key}")
        args = {} if args is None else args
        if not isinstance(args, dict):
            raise ConfigError(f"{field}.{key}", args, "expected the rule's fields, e.g. {scale: 1.5, interval: [0, 0.7]}")
        path = f"{cls.__module__}.{cls.__qualname__}"
        try:
            rules.append(instantiate(GuidanceRule, {"class_path": path, "init_args": args}, f"{field}.{key}"))
        except ConfigError as err:  # a rule names its fields guidance.<key>.*; here they sit at field.key.*
            prefix = f"guidance.{cls.key}"
            if not err.field.startswith(prefix):
                raise
            raise ConfigError(f"{field}.{key}{err.field[len(prefix):]}", err.value, err.allowed) from None
    return rules


def parse_settings(settings: Any, field: str) -> dict[str, list[GuidanceRule]]:
    """Named guidance settings ``{name: {rule: {fields}}}`` -> {name: rules}; ``{}`` is the unguided model.

    Names become metric names (``fd_digits/<name>``), so they may hold letters, digits, ``_ . -`` only.
    """
    if not isinstance(settings, dict) or not settings:
        raise ConfigError(field, settings, "expected a mapping of setting names to rules, e.g. "
                                           "{none: {}, ig: {ig: {scale: 2.0}}}")
    parsed = {}
    for name, spec in settings.items():
        if not isinstance(name, str) or not SETTING_NAME.match(name):
            raise ConfigError(field, name, "setting names may hold letters, digits, '_', '.' and '-' only "
                                           "(they become MLflow metric names)")
        parsed[name] = build_rules(spec, f"{field}.{name}")
    return parsed


def describe(rules: list[GuidanceRule]) -> dict:
    """{key: rule.describe()} of a setting, for logs."""
    return {rule.key: rule.describe() for rule in rules}
