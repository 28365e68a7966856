"""`igdit fit` / `igdit validate`: train or validate an experiment (the Lightning CLI).

    igdit fit --config experiments/<x>.yaml [--dotted.overrides ...]
    torchrun --nnodes N --nproc_per_node G ... -m igdit.cli fit ... --trainer.num_nodes N --trainer.devices G
"""
from __future__ import annotations

from igdit.experiment import run_lightning_cli


def main(argv: list[str] | None) -> int:
    """``argv`` starts with the subcommand (fit or validate); None: LightningCLI reads sys.argv itself."""
    run_lightning_cli(argv)
    return 0
