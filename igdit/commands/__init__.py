"""The `igdit` command: one dispatcher in front of every subcommand, and the one place that turns a
configuration error into its one-line message (``error: <field>: <what is wrong>``, exit code 2).

Nothing heavy is imported here: ``igdit --help`` and ``igdit --version`` answer without torch, and each
subcommand imports what it needs when it runs.
"""
from __future__ import annotations

import importlib
import logging
import sys
import warnings

from jsonargparse import ArgumentError

from igdit.commands.helpcache import answer_help, is_plain_help
from igdit.config import ConfigError, NothingToTrain, TrainingStopped, config_error_in, one_line

# subcommand -> (module under igdit.commands, what it does)
COMMANDS = {
    "fit": ("fit", "train an experiment: igdit fit -c experiments/default.yaml [--dotted.overrides]"),
    "validate": ("fit", "validate a checkpoint with an experiment's validation (and FID) settings"),
    "data": ("data", "build latent shards: igdit data build digits data/digits"),
    "sample": ("sample", "sample images from a checkpoint: igdit sample --ckpt last.ckpt --preset sit-xl2-ig-cfg"),
    "eval": ("eval", "Fréchet distance of a checkpoint (--ckpt, --experiment) or a sample file (--npz, --ref)"),
    "sweep": ("sweep", "run or continue an Optuna study: igdit sweep sweeps/ig_guidance.yaml"),
    "import-ckpt": ("import_ckpt", "import an official SiT+IG checkpoint: igdit import-ckpt --from official-sit ..."),
    "reproduce": ("reproduce", "the papers' claims at small scale: igdit reproduce experiments/studies/reproduce.yaml [--quick]"),
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("igdit")
    except PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        return "unknown (not installed)"


def usage() -> str:
    lines = ["usage: igdit <command> [-c options.yaml] [--print_config] [options]", "       igdit --version", "",
             "commands:"]
    lines += [f"  {name:<12} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`igdit <command> --help` lists a command's options (LightningCLI's style: --option_name, "
                  "--section.field);", "every option can also come from -c/--config, a YAML that "
                  "`--print_config` writes."]
    return "\n".join(lines)


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in record.getMessage() for fragment in self.fragments)


def quiet_third_party() -> None:
    """Silence what other libraries print on every command that says nothing to an igdit user."""
    # Lightning's advertisement for its cloud logger, on every fit
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning_utilities.core.rank_zero"):
        logging.getLogger(name).addFilter(_DropMessages("litlogger"))
    # Optuna marks plots and options igdit uses on purpose as experimental (optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=r".* is experimental \(supported from v")
    warnings.filterwarnings("ignore", message=r".* is an experimental feature")
    # `igdit eval`/`validate` load a checkpoint outside fit: the EMA weights are its state_dict, nothing is lost
    warnings.filterwarnings("ignore", message="You're using the WeightAveraging callback, but loading a checkpoint")
    # torch 2.9+ deprecates a pytree class Lightning still checks for
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    if args[0] in ("-V", "--version"):
        print(f"igdit {version()}")
        return 0
    if args[0] not in COMMANDS:
        print(f"error: command: {args[0]!r} is not an igdit command; choose one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    quiet_third_party()
    if is_plain_help(args[1:]):
        return answer_help(" ".join(args[:-1]), lambda: _run(args, argv))
    return _run(args, argv)


def _run(args: list[str], argv: list[str] | None) -> int:
    """Import the command's module (only now: torch, Lightning, ...) and run it; configuration errors as one line."""
    module = importlib.import_module(f"igdit.commands.{COMMANDS[args[0]][0]}")
    try:
        # fit/validate: LightningCLI takes its subcommand itself (and reads sys.argv when given None).
        if args[0] in ("fit", "validate"):
            return module.main(None if argv is None else args)
        return module.main(args[1:])
    except (ConfigError, ArgumentError) as err:
        print("error: " + one_line(err), file=sys.stderr)
        return 2
    except ValueError as err:  # jsonargparse wraps a ConfigError raised while it builds a part
        wrapped = config_error_in(err)
        if wrapped is None:
            raise
        print("error: " + one_line(wrapped), file=sys.stderr)
        return 2
    except NothingToTrain as err:
        print(str(err), flush=True)
        return 0
    except TrainingStopped as err:
        print("error: " + stopped_line(err), file=sys.stderr)
        return err.exit_code


def stopped_line(err: TrainingStopped) -> str:
    """The one line of a stopped run. Raised in a DataLoader worker, the error comes back re-created around the
    worker's whole traceback ("Caught TrainingStopped in DataLoader worker process 0. Original Traceback ..."): its
    last line is the message."""
    text = str(err)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())
