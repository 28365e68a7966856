"""`igdit sweep <file.yaml>`: run or continue an Optuna study reported in MLflow (igdit/sweeps/).

    igdit sweep sweeps/ig_guidance.yaml [--ckpt runs/<exp>/<run>/checkpoints/last.ckpt] [--n_trials 40]

The study lives in its storage (sqlite:///optuna.db by default): the same command again continues it; workers
started against the same storage share it.
"""
from __future__ import annotations

import sys
from typing import Optional

from jsonargparse.typing import PositiveInt

from igdit.commands.common import add_config_option, check_positional_file, refuse_misplaced_files, underscore_options
from igdit.config import config_parser


def build_parser():
    parser = config_parser(prog="igdit sweep", description=__doc__)
    add_config_option(parser)
    parser.add_argument("sweep", type=str, help="sweep definition, e.g. sweeps/ig_guidance.yaml")
    parser.add_argument("--ckpt", type=Optional[str], default=None, help="checkpoint of a sampling sweep (default: "
                        "the file's checkpoint, else the newest runs/<experiment>/*/checkpoints/last.ckpt)")
    parser.add_argument("--n_trials", type=Optional[PositiveInt], default=None,
                        help="total trials of the study (default: the file's)")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    argv = underscore_options(list(argv), parser, "sweep")
    refuse_misplaced_files(argv, "sweep", positional=("sweep", "sweep"))
    args = parser.parse_args(argv)
    check_positional_file(args.sweep, "sweep", "sweep", "sweep")
    from igdit.sweeps import SweepSpec, run_sweep  # torch, Lightning, Optuna, MLflow: not for --help
    try:
        run_sweep(SweepSpec.load(args.sweep), args.ckpt, args.n_trials)
    except KeyboardInterrupt:
        print("interrupted: the running trial is recorded as failed; run the same command again to continue",
              file=sys.stderr)
        return 130
    return 0
