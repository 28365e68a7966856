"""Which checkpoint `igdit fit --ckpt_path ...` continues, and which run it belongs to.

A run is one experiment config trained over time: its *identity* is its ``model`` and ``data`` sections as the
Lightning CLI resolves them, which are exactly the hyper-parameters every checkpoint stores (``hyper_parameters``,
``datamodule_hyper_parameters``) and the parameters its MLflow run holds. The trainer section may change between
sessions (``trainer.max_steps`` extends a run); the identity may not: an MLflow run cannot change a parameter, and a
changed architecture or data set is another experiment.

``last``: the newest resume point of this experiment's runs with the same identity (every ``*.ckpt`` of
<trainer.default_root_dir>/<experiment>/<run>/checkpoints/, periodic ones included, and Lightning's SLURM
pre-emption saves <trainer.default_root_dir>/hpc_ckpt_*.ckpt); an unreadable file is passed over for the next one
(and named); runs of other configs under the same experiment name are never continued. With
``trainer.logger.init_args.run_id``: that run only, and its config must be this one.
A file: read safely and checked the same way. Either way the logger reopens the run the checkpoint belongs to.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple, Optional

from igdit.checkpoints import read_checkpoint
from igdit.config import ConfigError, NothingToTrain

LIGHTNING_VALUES = ("best", "hpc", "registry")  # ckpt_path values that Lightning resolves itself
SHOWN_DIFFERENCES = 3


class Found(NamedTuple):
    path: Path
    checkpoint: dict  # read with its tensors mapped, not loaded


def identity(config: dict) -> dict:
    """A run's identity from a resolved experiment config (plain values): its ``model`` and ``data`` sections."""
    return {"model": config.get("model") or {}, "data": config.get("data") or {}}


def checkpoint_identity(checkpoint: dict) -> dict:
    """The identity of the run that wrote ``checkpoint``: the hyper-parameters Lightning stored in it (the keys it
    adds itself, ``_instantiator``/``_class_path``, and the frozen networks recorded at setup left out)."""
    model = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items()
             if not k.startswith("_") and k != "frozen_networks"}
    data = {k: v for k, v in (checkpoint.get("datamodule_hyper_parameters") or {}).items() if not k.startswith("_")}
    return {"model": model, "data": data}


def digest(ident: dict) -> str:
    """A short digest of an identity (the same config gives the same digest in every session)."""
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]


def differences(ours: dict, theirs: dict) -> list[str]:
    """``field: ours (the run's: theirs)`` for each dotted field whose values differ; a checkpoint that stores no
    data section (older igdit) is compared on the model only."""
    if not theirs.get("data"):
        ours, theirs = {"model": ours["model"]}, {"model": theirs["model"]}
    a, b = _flatten(ours), _flatten(theirs)
    return [f"{key}: {_show(a.get(key))} (the run's: {_show(b.get(key))})" for key in sorted(a.keys() | b.keys())
            if _canonical(a.get(key)) != _canonical(b.get(key))]


def describe_differences(found: list[str]) -> str:
    shown = "; ".join(found[:SHOWN_DIFFERENCES])
    return shown + (f"; and {len(found) - SHOWN_DIFFERENCES} more" if len(found) > SHOWN_DIFFERENCES else "")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _canonical(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value, sort_keys=True, default=str)


def _show(value: Any) -> str:
    text = _canonical(value)
    return text if len(text) <= 60 else text[:57] + "..."


def resume_points(root: Path, experiment: str, run_id: Optional[str]) -> list[Path]:
    """Every checkpoint a run of ``experiment`` (or the run ``run_id``) could continue from, newest first."""
    found = list((root / experiment).glob(f"{run_id or '*'}/checkpoints/*.ckpt"))
    found += list(root.glob("hpc_ckpt_*.ckpt"))  # Lightning's save on SLURM's pre-emption signal (SIGUSR1)
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def resolve_resume(config, resolved: dict, training: bool = True) -> Optional[str]:
    """The checkpoint ``config.ckpt_path`` means; sets the logger's ``run_id`` to its run.

    config: the subcommand's parsed config (a jsonargparse Namespace); resolved: the same config as plain values
    (``model`` and ``data`` sections as the CLI dumps them). Returns None for a fresh start (``last`` with no run of
    this config yet). One-line ConfigErrors for a file that is not a resumable checkpoint of this config;
    ``NothingToTrain`` when the run already reached ``trainer.max_steps``. ``training`` False (`igdit validate`):
    any readable checkpoint of the experiment, whatever its config and step."""
    ckpt_path = config["ckpt_path"]
    if ckpt_path in LIGHTNING_VALUES:
        return ckpt_path
    logger = config.get("trainer.logger")
    init_args = getattr(logger, "init_args", None) if str(getattr(logger, "class_path", "")).endswith(
        "MLflowLogger") else None
    run_id = getattr(init_args, "run_id", None) if init_args is not None else None
    ours = identity(resolved)
    if ckpt_path == "last":
        experiment = getattr(init_args, "experiment_name", None) or "igdit"
        point = _newest_of_this_config(Path(config.get("trainer.default_root_dir") or "."), experiment, run_id,
                                       ours if training else None)
        if point is None:
            return None
    else:
        point = Found(Path(ckpt_path), read_checkpoint(ckpt_path, "ckpt_path", mmap=True))
        found = differences(ours, checkpoint_identity(point.checkpoint)) if training else []
        if found:
            raise ConfigError("ckpt_path", str(ckpt_path), "belongs to a run of another config, and a run keeps its "
                              f"model and data: {describe_differences(found)}; resume with the run's own config "
                              "(config.yaml in its folder) or drop --ckpt_path to start a new run")
    if training:
        _check_resumable(point, config)
    run = point.checkpoint.get("igdit_run") or {}
    if init_args is not None and run_id is None and run.get("run_id"):
        init_args.run_id = run["run_id"]
    return str(point.path)


def _newest_of_this_config(root: Path, experiment: str, run_id: Optional[str],
                           ours: Optional[dict]) -> Optional[Found]:
    """The newest readable resume point of ``experiment`` (of the run ``run_id``) whose identity is ``ours`` (None:
    any); prints which files it passed over, or why it found none (a new run starts)."""
    folder = root / experiment
    unreadable, other_configs, chosen = [], {}, None
    for path in resume_points(root, experiment, run_id):
        try:
            checkpoint = read_checkpoint(path, "ckpt_path", mmap=True)
        except ConfigError as err:
            unreadable.append((path, err.allowed))
            continue
        run = checkpoint.get("igdit_run") or {}
        if run.get("experiment", experiment) != experiment or (run_id is not None and run.get("run_id") != run_id):
            continue  # a pre-emption save of another experiment or run
        found = differences(ours, checkpoint_identity(checkpoint)) if ours is not None else []
        if found:
            if run_id is not None:
                raise ConfigError("trainer.logger.init_args.run_id", run_id, "is a run of another config, and a run "
                                  f"keeps its model and data: {describe_differences(found)}; resume it with its own "
                                  "config (config.yaml in its folder) or drop run_id to start a new run")
            other_configs.setdefault(run.get("run_id") or path.parent.parent.name, found)
            continue
        chosen = Found(path, checkpoint)
        last = path.with_name("last.ckpt")
        if path.name != "last.ckpt" and last.is_file():  # the same step saved twice (periodic and last): prefer last
            try:
                same = read_checkpoint(last, "ckpt_path", mmap=True)
                if same.get("global_step") == checkpoint.get("global_step"):
                    chosen = Found(last, same)
            except ConfigError:
                pass
        break
    skipped = [(p, why) for p, why in unreadable if chosen is None or p.stat().st_mtime >= chosen.path.stat().st_mtime]
    if chosen is not None:
        if skipped:
            names = ", ".join(f"{p} ({why})" for p, why in skipped)
            print(f"--ckpt_path last: passing over the unreadable {names}; resuming from {chosen.path} (step "
                  f"{chosen.checkpoint.get('global_step')}), the newest readable checkpoint of this run", flush=True)
        return chosen
    if run_id is not None:
        raise ConfigError("trainer.logger.init_args.run_id", run_id, f"has no readable checkpoint under {folder / run_id}"
                          "/checkpoints (its folder was moved or deleted, or every file there is damaged); pass "
                          "--ckpt_path <file> of that run, or drop run_id to start a new run")
    which = f" with this config (model and data digest {digest(ours)})" if ours is not None else ""
    line = f"--ckpt_path last: no run of {experiment!r}{which} has a checkpoint under {folder}; starting a new run"
    if other_configs:
        newest, found = next(iter(other_configs.items()))
        line += f" ({len(other_configs)} run(s) there have another config, the newest, {newest}, differs in " \
                f"{describe_differences(found)})"
    if unreadable:
        line += f" ({len(unreadable)} unreadable checkpoint(s) passed over, e.g. {unreadable[0][0]})"
    print(line, flush=True)
    return None


def _check_resumable(point: Found, config) -> None:
    """A training state (not exported weights), and one with steps left to train."""
    checkpoint = point.checkpoint
    if "loops" not in checkpoint or "optimizer_states" not in checkpoint:
        raise ConfigError("ckpt_path", str(point.path), "holds weights only (an imported or exported model), not a "
                          "training state to continue; start a new run, or use it as a teacher or to sample from")
    step, max_steps = int(checkpoint.get("global_step", 0)), config.get("trainer.max_steps")
    if isinstance(max_steps, int) and 0 < max_steps <= step:
        run = (checkpoint.get("igdit_run") or {}).get("run_id") or point.path.parent.parent.name
        raise NothingToTrain(f"nothing to train: run {run} is at step {step} ({point.path}) and trainer.max_steps is "
                             f"{max_steps}; pass --trainer.max_steps above {step} to extend it, or drop --ckpt_path "
                             "to start a new run", str(point.path))
