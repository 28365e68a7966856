"""The `igdit` command: one dispatcher in front of every subcommand, and the one place that turns a
configuration error into its one-line message (``error: <field>: <what is wrong>``, exit code 2)."""
from __future__ import annotations

import importlib
import sys

from jsonargparse import ArgumentError

from igdit.config import ConfigError, NothingToTrain, TrainingStopped, config_error_in, one_line

# subcommand -> (module under igdit.commands, what it does)
COMMANDS = {
    "fit": ("fit", "train an experiment: igdit fit --config experiments/default.yaml [--dotted.overrides]"),
    "validate": ("fit", "validate a checkpoint with an experiment's validation (and FID) settings"),
    "data": ("data", "build latent shards: igdit data build digits data/digits"),
    "sample": ("sample", "sample images from a checkpoint: igdit sample --ckpt last.ckpt --preset sit-xl2-ig-cfg"),
    "eval": ("eval", "Fréchet distance of a checkpoint (--ckpt, --experiment) or a sample file (--npz, --ref)"),
    "sweep": ("sweep", "run or continue an Optuna study: igdit sweep sweeps/ig_guidance.yaml"),
    "import-ckpt": ("import_ckpt", "import an official SiT+IG checkpoint: igdit import-ckpt --from official-sit ..."),
    "reproduce": ("reproduce", "the papers' claims at small scale: igdit reproduce experiments/studies/reproduce.yaml [--quick]"),
}


def usage() -> str:
    lines = ["usage: igdit <command> [--config file.yaml] [--print_config] [options]", "", "commands:"]
    lines += [f"  {name:<12} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`igdit <command> --help` lists a command's options; every option can also come from --config."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    if args[0] not in COMMANDS:
        print(f"error: command: {args[0]!r} is not an igdit command; choose one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
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
