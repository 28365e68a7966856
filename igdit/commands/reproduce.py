"""`igdit reproduce`: the papers' claims at small scale, claim by claim (igdit/study/).

    igdit reproduce experiments/studies/reproduce.yaml            # the full study (5 seeds per arm)
    igdit reproduce experiments/studies/reproduce.yaml --quick    # a first look: fewer arms, one seed, shorter runs
    igdit reproduce experiments/studies/reproduce.yaml --seeds '[0, 1]'   # every arm with two seeds, reported
    igdit reproduce experiments/studies/reproduce.yaml --arms '[plain, ig_head]'   # two arms (+ what they read)
    igdit reproduce experiments/studies/reproduce.yaml --workers 2       # two runs at a time (one thread each)
    igdit reproduce experiments/studies/reproduce.yaml --seeds '[0, 1, 2, 3]' \
        --measurements '[experiments/studies/report-seeds-0-2/measurements.csv]'   # seeds 0-2 as measured there

Runs train seed by seed (every arm with the first seed, then the next seed), so an interrupted study already
covers every arm; --seeds and --arms report a part of the study, which the full command later reads back.
--measurements reads runs of another invocation (another machine, an earlier session) from the measurements.csv its
report wrote, instead of training them: their FD curves, sampling evaluations and probes as measured there, once the
protocol.json beside the file is found to match this study file.

Writes REPRODUCTION.md and plots into the study's results folder and into one MLflow parent run with a child per
training run. Run the same command again after an interruption: finished runs are read back, not redone.
"""
from __future__ import annotations

from typing import Optional

from jsonargparse.typing import NonNegativeInt, PositiveInt

from igdit.commands.common import add_config_option, check_positional_file, refuse_misplaced_files, underscore_options
from igdit.config import config_parser


def build_parser():
    parser = config_parser(prog="igdit reproduce", description=__doc__)
    add_config_option(parser)
    parser.add_argument("study", type=str, help="study definition, e.g. experiments/studies/reproduce.yaml")
    parser.add_argument("--quick", action="store_true", help="the study's quick variant")
    parser.add_argument("--seeds", type=Optional[list[int]], default=None,
                        help="only these of the study's seeds, trained and reported now")
    parser.add_argument("--arms", type=Optional[list[str]], default=None,
                        help="only these arms (and the arms whose checkpoints they read), trained and reported now")
    parser.add_argument("--workers", type=PositiveInt, default=1,
                        help="train this many runs at once, each process with its share of the CPU threads "
                             "(2 on 2 cores trains 1.5x as many runs per hour as 1)")
    parser.add_argument("--train_only", action="store_true",
                        help="train the runs and stop before the evaluations and the report")
    parser.add_argument("--measurements", type=Optional[list[str]], default=None,
                        help="measurements.csv files of other invocations of this study: their runs are read, "
                             "not trained (a run trained here is read from here)")
    parser.add_argument("--worker", type=Optional[NonNegativeInt], default=None,
                        help="(started by --workers) train the runs no other process holds, then stop")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    argv = underscore_options(list(argv), parser, "reproduce")
    refuse_misplaced_files(argv, "reproduce", positional=("study", "study"))
    args = parser.parse_args(argv)
    check_positional_file(args.study, "study", "reproduce", "study")
    from igdit.study.runner import Study, run_study  # torch, Lightning, MLflow: not for --help
    from igdit.study.spec import StudySpec
    from igdit.study.measurements import ImportedRuns
    spec = StudySpec.load(args.study, quick=args.quick, seeds=args.seeds, only_arms=args.arms)
    imported = ImportedRuns.load(args.measurements or [], spec)
    if args.worker is not None:
        Study(spec, imported=imported).train_claimed(args.worker)
        return 0
    run_study(spec, workers=args.workers, argv=argv, train_only=args.train_only,  # workers get argv + --worker k
              imported=imported)
    return 0
