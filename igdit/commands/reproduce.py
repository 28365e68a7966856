"""`igdit reproduce`: the papers' claims at small scale, claim by claim (igdit/study/).

    igdit reproduce experiments/studies/reproduce.yaml            # the full study (3 seeds per arm)
    igdit reproduce experiments/studies/reproduce.yaml --quick    # a first look: fewer arms, one seed, shorter runs
    igdit reproduce experiments/studies/reproduce.yaml --seeds '[0, 1]'   # every arm with two seeds, reported

Runs train seed by seed (every arm with the first seed, then the next seed), so an interrupted study already
covers every arm; --seeds reports a subset of the seeds, which the full command later reads back.

Writes REPRODUCTION.md and plots into the study's results folder and into one MLflow parent run with a child per
training run. Run the same command again after an interruption: finished runs are read back, not redone.
"""
from __future__ import annotations

from typing import Optional

from jsonargparse import ActionConfigFile

from igdit.config import config_parser
from igdit.study.runner import run_study
from igdit.study.spec import StudySpec


def build_parser():
    parser = config_parser(prog="igdit reproduce", description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of these options")
    parser.add_argument("study", type=str, help="study definition, e.g. experiments/studies/reproduce.yaml")
    parser.add_argument("--quick", action="store_true", help="the study's quick variant")
    parser.add_argument("--seeds", type=Optional[list[int]], default=None,
                        help="only these of the study's seeds, trained and reported now")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    run_study(StudySpec.load(args.study, quick=args.quick, seeds=args.seeds))
    return 0
