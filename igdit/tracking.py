"""MLflow as the default logger, and the run folder that holds a run's checkpoints, config and grids.

Default store: a sqlite file `mlflow.db` in the folder the run starts from (no server needed; since
MLflow 3.7 the file store is on its way out), artifacts in `mlartifacts/` beside it. `tracking_uri`
points at a server instead (the right choice for multi-node runs: sqlite on a network disk is fragile).
"""
from __future__ import annotations

import os
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
        kwargs = dict(experiment_name=experiment_name, run_name=run_name, tracking_uri=tracking_uri,
                      artifact_location=artifact_location, tags=tags, log_model=False, run_id=run_id)
        if _launcher_rank() == 0:
            super().__init__(**kwargs)
            return
        # Only rank 0 logs (Lightning's logger methods are rank-zero-only), but Lightning's constructor opens the
        # store in every process, and several processes creating one sqlite schema at once fail with
        # "duplicate column name". Other ranks get no client at all.
        import mlflow.tracking

        real, mlflow.tracking.MlflowClient = mlflow.tracking.MlflowClient, _NoClient
        try:
            super().__init__(**kwargs)
        finally:
            mlflow.tracking.MlflowClient = real


class _NoClient:
    """Stands in for MlflowClient in the logger of a rank other than 0, which never logs."""

    def __init__(self, tracking_uri: Optional[str] = None):
        self.tracking_uri = tracking_uri


def _launcher_rank() -> int:
    """This process's global rank as torchrun, Lightning's launcher or srun set it (0 for a single process)."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):  # Lightning's order: SLURM_PROCID may be set outside srun
        if os.environ.get(key) is not None:
            return int(os.environ[key])
    return 0


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
