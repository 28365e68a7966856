"""What every subcommand shares: LightningCLI's option style (underscores, ``-c/--config``), the old hyphenated
spellings as deprecated aliases, and a one-line refusal when a YAML of another kind is passed (a sweep file where an
experiment belongs, an experiment where the sweep file belongs, ...).

Kept free of torch and Lightning: ``igdit <command> --help`` imports only what the command's parser needs.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, Optional

import yaml
from jsonargparse import ActionConfigFile

from igdit.config import ConfigError

# The YAML files igdit reads, by the keys only that kind has, and how each is passed to which command.
FILE_KINDS = {
    "chain": "a chain of stages (igdit fit --config <file>)",
    "sweep": "a sweep file (igdit sweep <file>)",
    "study": "a study file (igdit reproduce <file>)",
    "experiment": "an experiment YAML (igdit fit --config <file>)",
}


def yaml_kind(path: str) -> Optional[str]:
    """"chain", "sweep", "study" or "experiment" by the file's top-level keys; None for anything else (an options
    file written by ``--print_config``, a file that does not exist or is not YAML: the parser reports those)."""
    try:
        content = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    if not isinstance(content, dict):
        return None
    if "stages" in content:
        return "chain"
    if "search_space" in content:
        return "sweep"
    if "arms" in content and "claims" in content:
        return "study"
    if "trainer" in content or any(isinstance(content.get(key), dict) for key in ("model", "data")):
        return "experiment"  # (import-ckpt's own options have a ``model`` too: a name)
    return None


def config_files(argv: Iterable[str]) -> list[str]:
    """The files given with ``-c``/``--config`` (``--config=x``, ``-c x``) before a ``--``."""
    argv = list(argv)
    if "--" in argv:
        argv = argv[: argv.index("--")]
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-c", "--config")]
    return files + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]


def refuse_misplaced_files(argv: list[str], command: str, positional: Optional[tuple[str, str]] = None,
                           experiment_option: Optional[str] = None) -> None:
    """One line naming the right option when a YAML of another kind is passed as an options file.

    positional: (kind, name) of the command's positional file (``("sweep", "sweep")`` for igdit sweep);
    experiment_option: the option that takes an experiment YAML (``--experiment`` for sample and eval)."""
    for path in config_files(argv):
        kind = yaml_kind(path)
        if kind is None:
            continue
        what = FILE_KINDS[kind].split(" (")[0]
        if positional is not None and kind == positional[0]:
            raise ConfigError("--config", path, f"this is {what}; pass it as the first argument: "
                                                f"igdit {command} {path}")
        if kind == "experiment" and experiment_option is not None:
            raise ConfigError("--config", path, f"this is an experiment YAML; pass it as {experiment_option} {path} "
                                                f"(-c/--config takes igdit {command}'s own options, as --print_config "
                                                "writes them)")
        raise ConfigError("--config", path, f"this is {FILE_KINDS[kind]}; -c/--config of `igdit {command}` takes "
                                            f"its own options, as `igdit {command} ... --print_config` writes them")


def check_positional_file(path: Optional[str], expected: str, command: str, field: str) -> None:
    """One line when the positional file ``field`` of ``command`` is a YAML of another kind than ``expected``."""
    kind = yaml_kind(path) if path else None
    if kind is not None and kind != expected:
        raise ConfigError(field, path, f"this is {FILE_KINDS[kind]}; `igdit {command}` takes "
                                       f"{FILE_KINDS[expected].split(' (')[0]}")


def add_config_option(parser) -> None:
    """``-c/--config``: a YAML of this command's options (what ``--print_config`` writes), as on ``igdit fit``."""
    parser.add_argument("-c", "--config", action=ActionConfigFile,
                        help="a YAML file with any of these options (--print_config writes one)")


def option_strings(parser) -> set[str]:
    """Every option string a jsonargparse parser accepts, its subcommands' included."""
    options = set(parser._option_string_actions)
    subcommands = getattr(parser, "_subcommands_action", None)
    for sub in (subcommands.choices.values() if subcommands is not None else ()):
        options |= option_strings(sub)
    return options


def underscore_options(argv: list[str], parser, command: str, err=None) -> list[str]:
    """``argv`` with the old hyphenated spellings (``--batch-size``) replaced by the options' names
    (``--batch_size``), each printing one deprecation line. Stops at ``--`` (what follows is not this
    parser's)."""
    err = err or sys.stderr
    known = option_strings(parser)
    out, warned = [], set()
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        name, eq, value = arg.partition("=")
        if name.startswith("--") and "-" in name[2:] and name not in known:
            new = "--" + name[2:].replace("-", "_")
            if new in known:
                if name not in warned:
                    print(f"igdit {command}: {name} is deprecated; use {new}", file=err)
                    warned.add(name)
                arg = new + eq + value
        out.append(arg)
    return out
