"""Internal Guidance (Zhou et al., CVPR 2026): extrapolate from the exit head's weak prediction through the final
head's strong one, in the same forward pass (docs/method.md §2, §5)."""
from __future__ import annotations

from typing import Optional

import torch
from jsonargparse.typing import NonNegativeFloat, PositiveInt

from igdit.config import ConfigError, UnitInterval
from igdit.guidance.base import GuidanceRule, extrapolate


def internal_guidance(v_final: torch.Tensor, v_exit: torch.Tensor, scale: float) -> torch.Tensor:
    """The IG rule: v = v_exit + w (v_final - v_exit); w = 1 returns v_final exactly. Shapes (N, C, H, W)."""
    return extrapolate(v_exit, v_final, scale)


class InternalGuidance(GuidanceRule):
    """IG inside each conditioning branch, with the exit head after block ``exit`` (default: the backbone's first).

    The public code applies it when ``w > 1`` and ``ig_low <= t <= ig_high`` on the velocity (docs/method.md §5);
    here any w != 1 acts. The exit head runs only while the rule is active.
    """

    key = "ig"
    order = 10

    def __init__(self, scale: NonNegativeFloat = 1.0, interval: UnitInterval = (0.0, 1.0),
                 exit: Optional[PositiveInt] = None):
        super().__init__(scale, interval)
        self.exit = exit

    def prepare(self, backbone) -> None:
        exits = tuple(backbone.exit_indices)
        if self.exit is None and exits:
            self.exit = exits[0]
        if self.scale != 1.0 and self.exit not in exits:
            raise ConfigError("guidance.ig.scale" if self.exit is None else "guidance.ig.exit",
                              self.scale if self.exit is None else self.exit,
                              f"needs an exit head; this model has exits {list(exits)} (scale 1 turns IG off)")

    def exits_needed(self) -> tuple[int, ...]:
        return (self.exit,)

    def apply(self, v: torch.Tensor, output, run, t: float) -> torch.Tensor:
        return internal_guidance(v, output.exits[self.exit], self.scale)

    def describe(self) -> dict:
        return super().describe() | ({"exit": self.exit} if self.exit is not None else {})
