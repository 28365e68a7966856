"""MLflow as the default logger, and the run folder that holds a run's checkpoints, config and grids.

Default store: a sqlite file `mlflow.db` in the folder the run starts from (no server needed; since
MLflow 3.7 the file store is on its way out), artifacts in `mlartifacts/` beside it. `tracking_uri`
points at a server instead (the right choice for multi-node runs: sqlite on a network disk is fragile).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger


def default_tracking_uri() -> str:
    return "sqlite:///" + str(Path("mlflow.db").resolve())


def default_artifact_location() -> str:
    return Path("mlartifacts").resolve().as_uri()


class MLflowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger with igdit's defaults (sqlite store in the project folder).

    experiment_name: MLflow experiment; run_name: optional run name; tracking_uri: None for the local
    sqlite store or e.g. "http://mlflow.cluster:5000"; artifact_location: where a NEW experiment keeps
    artifacts (default mlartifacts/ beside mlflow.db).
    """

    def __init__(self, experiment_name: str = "igdit", run_name: Optional[str] = None,
                 tracking_uri: Optional[str] = None, artifact_location: Optional[str] = None,
                 tags: Optional[dict[str, Any]] = None, run_id: Optional[str] = None):
        if tracking_uri is None:
            tracking_uri = default_tracking_uri()
            artifact_location = artifact_location or default_artifact_location()
        super().__init__(experiment_name=experiment_name, run_name=run_name, tracking_uri=tracking_uri,
                         artifact_location=artifact_location, tags=tags, log_model=False, run_id=run_id)


def run_directory(trainer) -> Path:
    """The run's own folder: <trainer.default_root_dir>/<experiment>/<mlflow run id or version>.

    Unique per run, so a new run never writes into (or over) an earlier run's checkpoints.
    """
    logger = trainer.logger
    if isinstance(logger, MLFlowLogger):
        name, run = logger._experiment_name, logger.run_id
    else:
        name, run = getattr(logger, "name", None) or "default", f"version_{getattr(logger, 'version', 0)}"
    return Path(trainer.default_root_dir) / str(name) / str(run)


class RunConfigSaver(SaveConfigCallback):
    """Writes the resolved config into the run folder and attaches it to the MLflow run.

    MLflow truncates long parameter values, so the full YAML is an artifact too; the module's and the
    data module's hyper-parameters are logged as parameters by Lightning itself.
    """

    def save_config(self, trainer, pl_module, stage: str) -> None:
        path = run_directory(trainer) / self.config_filename
        path.parent.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(path), skip_none=False, overwrite=False, multifile=False)
        logger = trainer.logger
        if isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(path))
