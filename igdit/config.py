"""Config validation: every bad value stops with one line naming the field, the value and what is allowed.

What a type can say is said by the type in the signature (``PositiveInt``, ``Literal[...]``, ``UnitInterval``):
jsonargparse checks it when the YAML or the command line is parsed, before anything is built. What only
several fields together can say (an interval's order, a patch that must divide the input) is checked in the
constructor with ``ConfigError``. The command dispatcher prints both as one line,
``error: <field>: <value> is not allowed; <what is>``, instead of a traceback (``one_line``).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import re
from typing import Any, Iterable, Optional

import yaml
from jsonargparse import ArgumentError, ArgumentParser, DefaultHelpFormatter
from jsonargparse.typing import ClosedUnitInterval

# A t-interval [low, high] in the project's time (t = 1 is noise); check_interval adds low <= high.
UnitInterval = tuple[ClosedUnitInterval, ClosedUnitInterval]


class ConfigError(ValueError):
    """A config value is not allowed. ``str(err)`` is one line: ``<field>: <value> <what is allowed>``."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}: {value!r} is not allowed; {allowed}")

    @classmethod
    def from_message(cls, message: str) -> "ConfigError":
        """The ConfigError whose one-line message is ``message`` (one that jsonargparse wrapped in its own)."""
        field, rest = message.split(": ", 1)
        value, allowed = rest.split(" is not allowed; ", 1)
        err = cls(field, value, allowed)
        err.args = (message,)
        return err


class TrainingStopped(RuntimeError):
    """A run stopped on purpose (divergence, too many unreadable samples); ``str(err)`` is one line that says why and
    which checkpoint to resume from. The command dispatcher prints it as ``error: ...`` (exit code 1)."""

    exit_code = 1


class NothingToTrain(Exception):
    """`--ckpt_path` names a run that has already trained ``trainer.max_steps`` steps; ``str(err)`` says so in one line
    and how to extend it, ``checkpoint`` is the run's last checkpoint. Not an error: the command dispatcher prints it
    and exits 0."""

    def __init__(self, line: str, checkpoint: str):
        super().__init__(line)
        self.checkpoint = checkpoint


class Interrupted(TrainingStopped):
    """A run stopped by a signal (SIGTERM from a scheduler, SIGINT from Ctrl-C) after saving where it stopped; exit code
    128 + the signal's number (143, 130), as a shell reports a process the signal ended, so a scheduler or torchrun
    never reads it as success."""

    def __init__(self, signal_name: str, line: str):
        import signal

        super().__init__(line)
        self.exit_code = 128 + int(getattr(signal, signal_name))


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


_PARSER_KEY = re.compile(r'^\s*Parser key "([^"]+)":\s*$')
_OURS = re.compile(r"^[\w.\[\]-]+: .* is not allowed; .+$")  # the shape of a ConfigError's message
_RESTRICTED = re.compile(r"^Not of type (\w+): ?(.*?) ?does not conform to restriction (.+)$")
_EXPECTED = re.compile(r"^Expected an? (.+?)\. Got value: (.+)$")
_GIVEN = re.compile(r"^Given value: (.+)$")
_UNKNOWN = re.compile(r"^(?:Group '[^']*' does not accept option '([^']+)'|Option '([^']+)' is not accepted)\.?$")
_CLASS_PATH = re.compile(r"^\s*-?\s*Problem with given class_path '([^']+)':")
_NOISE = re.compile(r"^\s*-?\s*(Not a valid subclass of|Subclass types expect one of|a class path \(str\)|"
                    r"a dict with|a dict without|Expected a <class 'NoneType'>|Does not validate against any of the Union subtypes|"
                    r"Subtypes:|Errors:|Given value type:|- Expected a <class 'NoneType'>)")


def one_line(err: BaseException) -> str:
    """A config error as one line ``<field>: <value> is not allowed; <what is>`` (the ConfigError format).

    ``ConfigError`` already is one; jsonargparse nests its reasons over several lines ('Parser key "model":',
    'Parser key "backbone":', ..., the innermost reason): the keys are joined into the dotted field, the value
    and the restriction are pulled out of the reason, so a bad value reads like every other error of igdit.
    """
    if isinstance(err, ConfigError):
        return " ".join(str(err).split())
    lines = str(err).splitlines()
    ours = [line.strip().lstrip("- ") for line in lines if _OURS.match(line.strip().lstrip("- "))]
    if ours:  # a ConfigError raised while jsonargparse built a nested part: it already names its field
        return ours[-1]
    keys, reasons, value = [], [], None
    for line in lines:
        text = line.strip().lstrip("- ").strip()
        match, part = _PARSER_KEY.match(line), _CLASS_PATH.match(line)
        restricted, expected, given = _RESTRICTED.match(text), _EXPECTED.match(text), _GIVEN.match(text)
        unknown = _UNKNOWN.match(text)
        if unknown:  # a key the part does not have
            option = unknown.group(1) or unknown.group(2)
            keys.append(option)
            value, reasons = option.rsplit(".", 1)[-1], reasons + ["unknown field"]
        elif match:
            keys.append(match.group(1))
        elif part and keys:  # a part chosen by class_path (a dict of terms does not say which key holds it)
            keys[-1] += f"[{part.group(1).rsplit('.', 1)[-1]}]"
        elif restricted:
            value = restricted.group(2) or value
            reasons.append(f"expected {restricted.group(1)} ({restricted.group(3)})")
        elif expected:
            value = expected.group(2)
            reasons.append(f"expected {expected.group(1)}")
        elif given:
            if not given.group(1).startswith(("{", "Namespace(", "[")) or value is None:
                value = given.group(1) if value is None else value
        elif text and not _NOISE.match(line):
            reasons.append(text)
    field = ".".join(keys)
    reason = "; ".join(dict.fromkeys(reasons)) or "is not accepted"
    if value is not None and len(value) <= 80:
        text = f"{field}: {value} is not allowed; {reason}"
    else:
        text = f"{field}: {reason}" if field else reason
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def config_error_in(err: BaseException) -> Optional["ConfigError"]:
    """The ConfigError behind ``err`` (jsonargparse re-raises one raised while it instantiates a part as its own
    ValueError), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class _KeepLayoutFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """Help text as the docstring lays it out: command examples stay one per line."""


def config_parser(**kwargs) -> ArgumentParser:
    """A jsonargparse parser that raises instead of exiting (the dispatcher prints the error as one line)."""
    return ArgumentParser(exit_on_error=False, formatter_class=_KeepLayoutFormatter, **kwargs)


def plain_config(parser: ArgumentParser, cfg) -> dict:
    """A parsed config as plain YAML values (class_path dicts, lists, numbers, strings)."""
    return yaml.safe_load(parser.dump(cfg, skip_none=False))


def plain_values(value: Any) -> Any:
    """``value`` (dicts, lists, numbers, strings) with the parser's restricted numbers (PositiveInt, ...) made plain
    ints and floats, which yaml.safe_dump would otherwise write as python tags that yaml.safe_load refuses."""
    return json.loads(json.dumps(value))


def instantiate(base: type, config: Any, field: str = "config") -> Any:
    """An instance of ``base`` (or a subclass) from ``{"class_path": ..., "init_args": {...}}``, type-checked as
    the CLI would; errors are one-line ConfigErrors naming ``field`` (e.g. ``FIDCallback.settings.ig.ig``)."""
    return _parse(lambda parser, key: parser.add_subclass_arguments(base, key, fail_untyped=False), config, field)


def build(cls: type, config: Any, field: str = "") -> Any:
    """A ``cls`` (a dataclass or a class with a typed signature) from a mapping of its fields, type-checked as
    the CLI would; errors are one-line ConfigErrors naming ``field`` (nothing: the fields are top-level keys)."""
    return _parse(lambda parser, key: parser.add_class_arguments(cls, key, fail_untyped=False), config, field)


def _parse(add, config: Any, field: str) -> Any:
    key = re.sub(r"\W", "_", field or "root")  # one flat identifier; messages get ``field`` back
    parser = config_parser()
    add(parser, key)
    try:
        return parser.instantiate(parser.parse_object({key: copy.deepcopy(config)}))[key]
    except ConfigError:
        raise
    except (ArgumentError, ValueError, TypeError) as err:  # a type the parser refused, or a ConfigError it wrapped
        # the parser names the part by its key (and appends the class it chose): put the field back
        message = re.sub(rf"^{re.escape(key)}(\[[^\]]+\])?" + ("" if field else r"\."), field, one_line(err))
        if _OURS.match(message):
            raise ConfigError.from_message(message) from None
        value = config.get("init_args", config) if isinstance(config, dict) else config
        raise ConfigError(field or "config", value, message.split(": ", 1)[-1]) from None
