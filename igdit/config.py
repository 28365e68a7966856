"""Config validation: every bad value stops with one line naming the field, the value and what is allowed.

Validation runs in constructors, so a wrong value fails when the object is built from the YAML or the
command line, before any data is read or any tensor is computed. The CLI prints ``ConfigError`` as a
single line (``error: <field>: <message>``) instead of a traceback.
"""
from __future__ import annotations

import math
from typing import Any, Iterable


class ConfigError(ValueError):
    """A config value is not allowed. ``str(err)`` is one line: ``<field>: <value> <what is allowed>``."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}: {value!r} is not allowed; {allowed}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number(field: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_inclusive: bool = True, high_inclusive: bool = True, integer: bool = False) -> Any:
    """Check that ``value`` is a finite number (an int if ``integer``) inside the given bounds."""
    kind = "an integer" if integer else "a number"
    bounds = []
    if low is not None:
        bounds.append(f"{'>=' if low_inclusive else '>'} {low}")
    if high is not None:
        bounds.append(f"{'<=' if high_inclusive else '<'} {high}")
    allowed = f"expected {kind}" + (f" {' and '.join(bounds)}" if bounds else "")
    if not _is_number(value) or (integer and not float(value).is_integer()) or not math.isfinite(value):
        raise ConfigError(field, value, allowed)
    if low is not None and (value < low or (not low_inclusive and value == low)):
        raise ConfigError(field, value, allowed)
    if high is not None and (value > high or (not high_inclusive and value == high)):
        raise ConfigError(field, value, allowed)
    return value


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> Any:
    """Check that ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(field, value, "choose one of " + ", ".join(repr(c) for c in choices))
    return value


def check_interval(field: str, value: Any) -> tuple[float, float]:
    """Check a t-interval ``[low, high]`` with 0 <= low <= high <= 1 (t = 1 is noise)."""
    allowed = "expected [low, high] with 0 <= low <= high <= 1 (t = 1 is noise)"
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(field, value, allowed) from None
    if not (0.0 <= low <= high <= 1.0):
        raise ConfigError(field, value, allowed)
    return low, high
