"""`igdit fit` / `igdit validate`: train or validate an experiment (the Lightning CLI).

    igdit fit --config experiments/<x>.yaml [--dotted.overrides ...]
    igdit fit --config experiments/<x>.yaml --ckpt_path last        # continue the newest run of the experiment
    torchrun --nnodes N --nproc_per_node G ... -m igdit.cli fit ... --trainer.num_nodes N --trainer.devices G

A chain of stages (`igdit fit --config experiments/st_digits.yaml`) trains experiments one after the other,
each a plain `igdit fit` of its own YAML; a stage can receive the previous stage's last checkpoint in one of
its fields. The chain file holds nothing else:

    stages:
      - config: st_stage1_digits.yaml                          # relative to the chain file
      - config: st_stage2_digits.yaml
        previous_checkpoint: model.terms.self_guided.teacher_ckpt
        overrides: []                                          # this stage's own command-line overrides

Overrides given after --config go to every stage. Every stage is parsed and built (its model on the meta device)
before the first one trains.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import yaml
from jsonargparse.typing import import_object
from lightning.pytorch.callbacks import ModelCheckpoint

from igdit.commands.common import FILE_KINDS, config_files, yaml_kind
from igdit.config import ConfigError, NothingToTrain, build, one_line
from igdit.data import LatentDataModule
from igdit.experiment import experiment_config, run_lightning_cli
from igdit.module import build_module

PLACEHOLDER = "<last checkpoint of stage {}>"


@dataclass
class Stage:
    """One experiment of a chain. previous_checkpoint: the dotted field (``model.terms.self_guided.teacher_ckpt``)
    that receives the last checkpoint of the stage before; overrides: command-line overrides of this stage."""

    config: str
    previous_checkpoint: Optional[str] = None
    overrides: list[str] = field(default_factory=list)


@dataclass
class Chain:
    stages: list[Stage]


class LoadedStage(NamedTuple):
    """A stage of a loaded chain: its experiment file, its full overrides (the previous stage's checkpoint as a
    placeholder) and its resolved config, as `--print_config` prints it."""

    stage: Stage
    path: Path
    args: list[str]
    config: dict


def check_config_files(argv: list[str]) -> None:
    """Every --config names an experiment or a chain: a YAML mapping (jsonargparse says only "Unexpected config"
    for an empty file), not a sweep or study file (which name the command that runs them)."""
    for path in config_files(argv):
        if not Path(path).is_file():
            continue
        kind = yaml_kind(path)
        if kind in ("sweep", "study"):
            raise ConfigError("--config", path, f"this is {FILE_KINDS[kind]}; -c/--config of `igdit fit` takes "
                                                "an experiment YAML such as experiments/default.yaml")
        try:
            content = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as err:
            raise ConfigError("--config", path, f"is not valid YAML ({' '.join(str(err).split())[:160]})") from None
        if not isinstance(content, dict) or not content:
            raise ConfigError("--config", path, "is empty or not a mapping; an experiment YAML has model, data and "
                                                "trainer sections (see experiments/default.yaml)")


def main(argv: list[str] | None) -> int:
    """``argv`` starts with the subcommand (fit or validate); None: LightningCLI reads sys.argv itself."""
    args = list(sys.argv[1:] if argv is None else argv)
    check_config_files(args)
    chain_file = _chain_file(args)
    if chain_file is None:
        run_lightning_cli(argv)
        return 0
    if args[0] != "fit":
        raise ConfigError("--config", chain_file, f"is a chain of stages, which only `igdit fit` runs; "
                                                  f"`igdit {args[0]}` takes one of its stage experiments")
    common = [a for a in args[1:] if a != chain_file and a not in ("-c", "--config") and not a.startswith("--config=")]
    printing = [a for a in common if a.startswith("--print_config")]
    common = [a for a in common if not a.startswith("--print_config")]
    stages = load_chain(chain_file, common, build_stages=not printing)  # printing needs no data, as for one experiment
    if printing:
        print_chain(stages)
        return 0
    return run_chain(stages)


def print_chain(stages: list[LoadedStage]) -> None:
    """Every stage's resolved config as `--print_config` prints one experiment (the checkpoint that a stage
    receives from the previous one shows as a placeholder)."""
    printed = []
    for stage, path, _, config in stages:
        entry = {"config": str(path)}
        if stage.previous_checkpoint is not None:
            entry["previous_checkpoint"] = stage.previous_checkpoint
        printed.append(entry | {"experiment": config})
    print(yaml.safe_dump({"stages": printed}, sort_keys=False), end="")


def _chain_file(args: list[str]) -> Optional[str]:
    """The --config file if it is a chain (a YAML mapping with ``stages``); a chain must be the only --config."""
    configs = config_files(args)
    chains = [c for c in configs if _is_chain(c)]
    if chains and len(configs) > 1:
        raise ConfigError("--config", chains[0], "a chain of stages is the only --config of its command")
    return chains[0] if chains else None


def _is_chain(path: str) -> bool:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False  # the Lightning CLI reports files it cannot read, as for any experiment
    return isinstance(raw, dict) and "stages" in raw


def load_chain(path: str, common: list[str], build_stages: bool = True) -> list[LoadedStage]:
    """The chain's stages, every one parsed once as `igdit fit` will parse it and (``build_stages``) built;
    one-line ConfigErrors naming the entry."""
    folder = Path(path).parent
    chain = build(Chain, yaml.safe_load(Path(path).read_text()))
    if not chain.stages:
        raise ConfigError("stages", [], "expected a list of experiments to train in order")
    out = []
    for i, stage in enumerate(chain.stages):
        key = f"stages[{i}]"
        experiment = folder / stage.config
        if not experiment.is_file():
            raise ConfigError(f"{key}.config", stage.config, f"no such experiment YAML (relative to {folder})")
        if _is_chain(str(experiment)):
            raise ConfigError(f"{key}.config", stage.config, "is a chain itself; a stage is one experiment")
        args = [*map(str, stage.overrides), *common]
        if stage.previous_checkpoint is not None:
            if i == 0:
                raise ConfigError(f"{key}.previous_checkpoint", stage.previous_checkpoint,
                                  "the first stage has no previous stage")
            args += [f"--{stage.previous_checkpoint}", PLACEHOLDER.format(i)]
            if not _keeps_last_checkpoint(out[-1].config):
                raise ConfigError(f"stages[{i - 1}].config", chain.stages[i - 1].config, f"keeps no last checkpoint "
                                  f"for stage {i + 1} (add a ModelCheckpoint with save_last: true)")
        try:
            config = experiment_config(str(experiment), args)
            if build_stages:
                _check_stage(config)
        except Exception as err:  # the experiment's own one-line error, named as the stage
            raise ConfigError(key, stage.config, one_line(err)) from None
        out.append(LoadedStage(stage, experiment, args, config))
    return out


def _check_stage(config: dict) -> None:
    """Build a parsed stage's model (on the meta device: no memory, no compute) and its data, so that a later
    stage's bad value stops the chain before the first stage trains."""
    with torch.device("meta"):
        model = build_module(config["model"])
    LatentDataModule(**config["data"]).check_model(model.latent_shape, model.num_classes)


def _keeps_last_checkpoint(config: dict) -> bool:
    callbacks = config["trainer"].get("callbacks") or []
    return any(issubclass(import_object(c["class_path"]), ModelCheckpoint)
               and (c.get("init_args") or {}).get("save_last") for c in callbacks)


def run_chain(stages: list[LoadedStage]) -> int:
    """Train the stages in order, each through the Lightning CLI; each prints its usual summary, the chain
    then names the checkpoints it passed on."""
    previous, passed, zero = None, [], True
    for i, (stage, experiment, args, _) in enumerate(stages, start=1):
        if stage.previous_checkpoint is not None:
            args = [a if a != PLACEHOLDER.format(i - 1) else previous for a in args]
            passed.append((i - 1, previous, i, stage.previous_checkpoint))
        try:
            cli = run_lightning_cli(["fit", "--config", str(experiment), *args])
        except NothingToTrain as done:  # `--ckpt_path last` on a chain whose earlier stage had already finished
            print(f"stage {i}: {done}", flush=True)
            previous = done.checkpoint
            continue
        zero = cli.trainer.is_global_zero
        previous = next((c.last_model_path for c in cli.trainer.checkpoint_callbacks
                         if getattr(c, "last_model_path", "")), None)
        if previous is None and i < len(stages):
            raise ConfigError(f"stages[{i - 1}].config", str(experiment), "finished without a last checkpoint")
    if zero:
        lines = ["", "== igdit chain finished =="]
        lines += [f"stage {source} checkpoint  {path}  (passed to stage {target} as {field_})"
                  for source, path, target, field_ in passed]
        print("\n".join(lines), flush=True)
    return 0
