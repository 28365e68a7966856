"""`igdit sweep <file.yaml>`: run or continue an Optuna study reported in MLflow (igdit/sweeps/).

    igdit sweep sweeps/ig_guidance.yaml [--ckpt runs/<exp>/<run>/checkpoints/last.ckpt] [--n-trials 40]

The study lives in its storage (sqlite:///optuna.db by default): the same command again continues it; workers
started against the same storage share it.
"""
from __future__ import annotations

import sys
from typing import Optional

from jsonargparse import ActionConfigFile
from jsonargparse.typing import PositiveInt

from igdit.config import config_parser
from igdit.sweeps import SweepSpec, run_sweep


def build_parser():
    parser = config_parser(prog="igdit sweep", description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of these options")
    parser.add_argument("sweep", type=str, help="sweep definition, e.g. sweeps/ig_guidance.yaml")
    parser.add_argument("--ckpt", type=Optional[str], default=None, help="checkpoint of a sampling sweep (default: "
                        "the file's checkpoint, else the newest runs/<experiment>/*/checkpoints/last.ckpt)")
    parser.add_argument("--n-trials", type=Optional[PositiveInt], default=None,
                        help="total trials of the study (default: the file's)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_sweep(SweepSpec.load(args.sweep), args.ckpt, args.n_trials)
    except KeyboardInterrupt:
        print("interrupted: the running trial is recorded as failed; run the same command again to continue",
              file=sys.stderr)
        return 130
    return 0
