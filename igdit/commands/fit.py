"""`igdit fit` / `igdit validate`: train or validate an experiment (the Lightning CLI).

    igdit fit --config experiments/<x>.yaml [--dotted.overrides ...]
    igdit fit --config experiments/<x>.yaml --ckpt_path last        # continue the newest run of the experiment
    torchrun --nnodes N --nproc_per_node G ... -m igdit.cli fit ... --trainer.num_nodes N --trainer.devices G
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from igdit.config import ConfigError
from igdit.experiment import run_lightning_cli


def check_config_files(argv: list[str]) -> None:
    """Every --config names a YAML mapping (jsonargparse says only "Unexpected config" for an empty file)."""
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg[len("--config="):] \
            if arg.startswith("--config=") else None
        if path is None or not Path(path).is_file():
            continue
        try:
            content = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as err:
            raise ConfigError("--config", path, f"is not valid YAML ({' '.join(str(err).split())[:160]})") from None
        if not isinstance(content, dict) or not content:
            raise ConfigError("--config", path, "is empty or not a mapping; an experiment YAML has model, data and "
                                                "trainer sections (see experiments/default.yaml)")


def main(argv: list[str] | None) -> int:
    """``argv`` starts with the subcommand (fit or validate); None: LightningCLI reads sys.argv itself."""
    check_config_files(sys.argv[1:] if argv is None else argv)
    run_lightning_cli(argv)
    return 0
