"""An experiment YAML through the Lightning CLI: what `igdit fit` and `igdit validate` run, and the one path by
which `igdit eval` and training sweeps read and build an experiment.

Any config field can be overridden on the command line with its dotted path, e.g.
`igdit fit --config experiments/default.yaml --model.backbone.exits [4] --model.terms.ig_exit.weight 0.25`.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from igdit.callbacks import StopOnSignal
from igdit.checkpoints import AtomicCheckpointIO, checkpoint_step, newest_checkpoint
from igdit.compat import mlflow_experiment_name, mlflow_tracking_uri
from igdit.config import ConfigError, Interrupted
from igdit.data import LatentDataModule
from igdit.distributed import check_accelerator, check_launch
from igdit.module import IGDiTModule
from igdit.resume import resolve_resume
from igdit.tracking import MLflowLogger, RunConfigSaver, check_store, run_directory


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
        column Lightning cannot fill (and with the FLOPs of a training step); checkpoints written atomically
        (``AtomicCheckpointIO``) and SIGTERM/SIGINT answered (``StopOnSignal``)."""
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
        # checkpoints written whole (a CheckpointIO plugin the config gives stays), and signals answered
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        trainer.callbacks.append(StopOnSignal())
        return trainer

    def before_instantiate_classes(self) -> None:
        # Under torchrun/srun the process layout is fixed: trainer.devices and num_nodes must match it.
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer") or {}
        check_launch(trainer.get("devices"), trainer.get("num_nodes"))
        check_accelerator(trainer.get("accelerator"))
        if self.subcommand == "fit" and trainer.get("max_steps") != -1 and not (
                isinstance(trainer.get("max_steps"), int) and trainer.get("max_steps") >= 1):
            raise ConfigError("trainer.max_steps", trainer.get("max_steps"), "expected the number of optimizer steps "
                              "to train, >= 1 (or -1: until trainer.max_epochs)")
        if "weights_only" in config and config.get("weights_only") is None:
            config["weights_only"] = True  # a checkpoint never runs code, whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says
        if config.get("ckpt_path") is not None:
            resolved = yaml.safe_load(self._parser(self.subcommand).dump(config, skip_none=False))
            config["ckpt_path"] = resolve_resume(config, resolved, training=self.subcommand == "fit")

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
        # a teacher or an encoder's weights that cannot be read or do not fit: refused before the run exists
        self.model.load_frozen_networks(self.datamodule)
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init  # run=False: no subcommand
        resuming = config.get("ckpt_path") is not None
        logger = trainer.logger
        if isinstance(logger, MLflowLogger) and trainer.is_global_zero:  # last: the run is created next
            from_environment = os.environ.get("MLFLOW_TRACKING_URI") == mlflow_tracking_uri(logger)
            check_store(mlflow_tracking_uri(logger), "MLFLOW_TRACKING_URI" if from_environment
                        else "trainer.logger.init_args.tracking_uri")
        for checkpoint in trainer.checkpoint_callbacks:
            if checkpoint.dirpath is None:
                # Each run gets its own folder, so no run can overwrite another run's checkpoints.
                checkpoint.dirpath = str(run_directory(trainer) / "checkpoints")
            folder = Path(checkpoint.dirpath)
            if not resuming and folder.is_dir() and any(folder.iterdir()):
                raise ConfigError("ModelCheckpoint.dirpath", checkpoint.dirpath, "already holds checkpoints of "
                                  "another run; choose an empty folder (nothing is deleted)")

    def fit(self, model, **kwargs) -> None:
        """``trainer.fit`` (the LightningCLI calls this method in its place), with signals and refusals answered:
        SIGTERM/SIGINT end the run as KILLED after last.ckpt holds the step they stopped at (``Interrupted``: one
        line, exit code 128 + the signal); a config refused once fit started leaves a reopened run as it was."""
        trainer = self.trainer
        stop = next(c for c in trainer.callbacks if isinstance(c, StopOnSignal))
        with stop.listening():
            try:
                trainer.fit(model, **kwargs)
            except ConfigError:
                if isinstance(trainer.logger, MLflowLogger):
                    trainer.logger.restore_status()
                raise
            except (SIGTERMException, KeyboardInterrupt, SystemExit):
                # Lightning ends a SIGTERM as a SystemExit (exit code 0) and a KeyboardInterrupt as sys.exit(1)
                if stop.received is None:
                    raise
                if isinstance(trainer.logger, MLflowLogger):
                    trainer.logger.close_as("KILLED")
                raise Interrupted(stop.received, interruption_line(trainer, stop.received)) from None

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print(run_summary(self.trainer), flush=True)


def interruption_line(trainer, name: str) -> str:
    """What a run stopped by a signal says: where it stopped, what holds that step, how to continue."""
    checkpoint = next((c for c in trainer.checkpoint_callbacks if getattr(c, "save_last", False)), None)
    last = Path(checkpoint.last_model_path) if checkpoint is not None and checkpoint.last_model_path else None
    if last is None or not last.is_file():
        last = newest_checkpoint(checkpoint.dirpath) if checkpoint is not None and checkpoint.dirpath else None
    step = checkpoint_step(last) if last is not None else None
    saved = f"{last} holds step {step}" if step is not None else "no checkpoint was written yet"
    run = f" (MLflow run {trainer.logger.run_id} marked KILLED)" if isinstance(trainer.logger, MLflowLogger) and \
        trainer.is_global_zero else ""
    return (f"stopped by {name} at step {trainer.global_step}{run}; {saved}; continue with the same command and "
            "--ckpt_path last" + ("" if step is not None else " (it starts anew)"))


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
