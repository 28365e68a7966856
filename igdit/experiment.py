"""An experiment YAML through the Lightning CLI: what `igdit fit` and `igdit validate` run, and the one path by
which `igdit eval` and training sweeps read and build an experiment.

Any config field can be overridden on the command line with its dotted path, e.g.
`igdit fit --config experiments/default.yaml --model.backbone.exits [4] --model.terms.ig_exit.weight 0.25`.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import MLFlowLogger

from igdit.checkpoints import read_checkpoint
from igdit.compat import mlflow_experiment_name, mlflow_tracking_uri
from igdit.config import ConfigError
from igdit.data import LatentDataModule
from igdit.distributed import check_launch
from igdit.module import IGDiTModule
from igdit.tracking import RunConfigSaver, run_directory


class IGDiTCLI(LightningCLI):
    """LightningCLI with igdit's launch checks, run folder and end-of-run summary; subcommands fit and validate."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # test and predict would do nothing useful for a generative model: igdit eval and igdit sample do that.
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
                "validate": {"model", "dataloaders", "datamodule"}}

    def _parse_ckpt_path(self) -> None:
        # Lightning would read the model's hyper-parameters from --ckpt_path into the config (and let a damaged
        # or unsafe file raise a traceback): here the experiment's YAML says what is built, and resolve_resume
        # reads the checkpoint safely, with one-line errors.
        pass

    def instantiate_trainer(self, **kwargs):
        """Lightning's Trainer with igdit's own run bookkeeping: the last step's losses logged whatever
        log_every_n_steps is, evaluations of a checkpoint logged at its step, a model summary without the FLOPs
        column Lightning cannot fill (and with the FLOPs of a training step)."""
        from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary

        from igdit.callbacks import FinalStepMetrics, ModelSummary, StepFromCheckpoint

        trainer = super().instantiate_trainer(**kwargs)
        callbacks = [ModelSummary(max_depth=c._max_depth, **c._summarize_kwargs) if type(c) is LightningModelSummary
                     else c for c in trainer.callbacks]
        own = [callback() for callback in (FinalStepMetrics, StepFromCheckpoint)
               if not any(isinstance(c, callback) for c in callbacks)]
        # Lightning keeps checkpoint callbacks last (they save what the others have done): igdit's go before them
        first_checkpoint = next((i for i, c in enumerate(callbacks) if isinstance(c, ModelCheckpoint)), len(callbacks))
        trainer.callbacks = callbacks[:first_checkpoint] + own + callbacks[first_checkpoint:]
        return trainer

    def before_instantiate_classes(self) -> None:
        # Under torchrun/srun the process layout is fixed: trainer.devices and num_nodes must match it.
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer") or {}
        check_launch(trainer.get("devices"), trainer.get("num_nodes"))
        if "weights_only" in config and config.get("weights_only") is None:
            config["weights_only"] = True  # a checkpoint never runs code, whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says
        if config.get("ckpt_path") is not None:
            config["ckpt_path"] = resolve_resume(config)

    def before_fit(self) -> None:
        # Shapes, the world and the callbacks' settings first: a mismatch must stop before anything (an MLflow run
        # or its store included) is created, and before Lightning starts the other processes.
        self.datamodule.check_model(self.model.latent_shape, self.model.num_classes)
        trainer = self.trainer
        # trainer.world_size is still 1 here (the strategy sets it when it starts the processes): count it.
        self.datamodule.check_world_size(trainer.num_nodes * trainer.num_devices)
        for callback in trainer.callbacks:
            if hasattr(callback, "check"):
                callback.check(trainer, self.model)
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init  # run=False: no subcommand
        resuming = config.get("ckpt_path") is not None
        for checkpoint in trainer.checkpoint_callbacks:
            if checkpoint.dirpath is None:
                # Each run gets its own folder, so no run can overwrite another run's checkpoints.
                checkpoint.dirpath = str(run_directory(trainer) / "checkpoints")
            folder = Path(checkpoint.dirpath)
            if not resuming and folder.is_dir() and any(folder.iterdir()):
                raise ConfigError("ModelCheckpoint.dirpath", checkpoint.dirpath, "already holds checkpoints of "
                                  "another run; choose an empty folder (nothing is deleted)")

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print(run_summary(self.trainer), flush=True)


def run_summary(trainer) -> str:
    """What a person needs after a run: where the MLflow run is, the final losses, the sample grid."""
    lines = ["", "== igdit run finished =="]
    logger = trainer.logger
    if isinstance(logger, MLFlowLogger):
        uri = mlflow_tracking_uri(logger)
        lines.append(f"MLflow run      {logger.run_id} (experiment '{mlflow_experiment_name(logger)}') in {uri}")
        lines.append(f"  open it with  mlflow ui --backend-store-uri {uri}")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k and v.numel() == 1}
    losses = {k: v for k, v in sorted(metrics.items()) if k.startswith(("train/", "val/")) and "per_sec" not in k}
    if losses:
        lines.append("final losses    " + "  ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        lines.append("                (val/* are scored with the EMA weights when EMAWeightAveraging is on)")
    scores = {k: v for k, v in sorted(metrics.items()) if k.split("/")[0] in ("fd_digits", "fid", "is")}
    if scores:
        lines.append("sample quality  " + "  ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    logged = trainer.logged_metrics
    if "train/time" in logged and "train/samples" in logged:  # from ThroughputMonitor; validation excluded
        seconds, samples = float(logged["train/time"]), float(logged["train/samples"])
        lines.append(f"training        {seconds:.0f} s, {samples / max(seconds, 1e-9):.0f} samples/s")
    grid = next((cb for cb in trainer.callbacks if getattr(cb, "path", None) is not None), None)
    if grid is not None:
        columns = ", ".join(getattr(grid, "settings", None) or {})
        lines.append(f"samples         {grid.path}  (one row per class; left to right: {columns or 'the model'})")
    if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.last_model_path:
        lines.append(f"checkpoint      {trainer.checkpoint_callback.last_model_path}")
    return "\n".join(lines)


def run_lightning_cli(argv: list[str] | None, run: bool = True) -> IGDiTCLI:
    """Build (and by default run) the LightningCLI on `argv`; a sweep trial and `igdit eval` reuse this path."""
    return _build_cli(
        IGDiTCLI,
        args=argv,
        run=run,
        save_config_callback=RunConfigSaver,
        save_config_kwargs={"save_to_log_dir": False},
        # exit_on_error=False: a bad value raises instead of printing the whole usage; the dispatcher prints one line.
        parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
        auto_configure_optimizers=False,  # the optimiser is model.optimizer (IGDiTModule.configure_optimizers)
    )


class _ParseOnly(IGDiTCLI):
    """The CLI's parser and its checks, without building anything."""

    def instantiate_classes(self) -> None:
        pass


def _parse_only(config: str, overrides: list[str] = ()) -> _ParseOnly:
    return _build_cli(_ParseOnly, args=["--config", config, *overrides], run=False, save_config_callback=None,
                      parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
                      auto_configure_optimizers=False)


def _build_cli(cli_class: type[IGDiTCLI], **kwargs) -> IGDiTCLI:
    with warnings.catch_warnings():
        # Lightning warns when args are given while sys.argv holds others; igdit parses what a sweep trial, a chain
        # stage or a study run gives it on purpose, so the warning would only be noise on every such command.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return cli_class(IGDiTModule, LatentDataModule, **kwargs)


def parse_experiment(config: str, overrides: list[str] = ()):
    """The experiment ``config`` with ``overrides``, parsed and validated exactly as `igdit fit` does, but nothing
    built (no model, no MLflow run): a jsonargparse Namespace with ``model``, ``data``, ``trainer``, ..."""
    return _parse_only(config, overrides).config


def experiment_config(config: str, overrides: list[str] = ()) -> dict:
    """The experiment as `igdit fit --config <config> <overrides> --print_config` prints it, as a plain dict."""
    cli = _parse_only(config, overrides)
    printed = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
    printed.pop("config", None)  # the file it came from, which the caller names itself
    return printed


def resolve_resume(config) -> Optional[str]:
    """The checkpoint ``ckpt_path`` means, and the run it continues.

    ``last``: the newest ``last.ckpt`` of this experiment's runs (<trainer.default_root_dir>/<experiment>/*/checkpoints/,
    or of the run ``trainer.logger.init_args.run_id`` names), or a newer checkpoint Lightning saved when SLURM
    pre-empted the job (<trainer.default_root_dir>/hpc_ckpt_*.ckpt); none yet: a fresh start, as Lightning does. A file: read
    safely (weights only) and checked. Either way the MLflow logger reopens the run the checkpoint belongs to, so
    the resumed run writes into the same run and folder. Other values (``best``, ``hpc``) are Lightning's."""
    ckpt_path = config["ckpt_path"]
    logger = config.get("trainer.logger")
    init_args = getattr(logger, "init_args", None) if str(getattr(logger, "class_path", "")).endswith(
        "MLflowLogger") else None
    run_id = getattr(init_args, "run_id", None) if init_args is not None else None
    if ckpt_path == "last":
        experiment = getattr(init_args, "experiment_name", None) or "igdit"
        root = Path(config.get("trainer.default_root_dir") or ".")
        folder = root / experiment
        found = list(folder.glob(f"{run_id or '*'}/checkpoints/last.ckpt"))
        # what Lightning saves on SLURM's pre-emption signal (SIGUSR1) before it requeues the job, if it is ours
        found += [p for p in root.glob("hpc_ckpt_*.ckpt") if _belongs_to(p, experiment, run_id)]
        found.sort(key=lambda p: p.stat().st_mtime)
        if not found:
            print(f"--ckpt_path last: no run of {experiment!r} under {folder} has a last.ckpt yet; starting a new run",
                  flush=True)
            return None
        ckpt_path = str(found[-1])
    elif ckpt_path in ("best", "hpc", "registry"):
        return ckpt_path
    run = read_checkpoint(ckpt_path, "ckpt_path").get("igdit_run") or {}
    if init_args is not None and run_id is None and run.get("run_id"):
        init_args.run_id = run["run_id"]
    return ckpt_path


def _belongs_to(checkpoint: Path, experiment: str, run_id: Optional[str]) -> bool:
    run = read_checkpoint(checkpoint, "ckpt_path").get("igdit_run") or {}
    return run.get("experiment") == experiment and run_id in (None, run.get("run_id"))
