"""MLflow as the default logger, and the run folder that holds a run's checkpoints, config and grids.

Default store: a sqlite file `mlflow.db` in the folder the run starts from (no server needed; since
MLflow 3.7 the file store is on its way out), artifacts in `mlartifacts/` beside it. `tracking_uri`
points at a server instead (the right choice for multi-node runs: sqlite on a network disk is fragile).
"""
from __future__ import annotations

import itertools
import os
import secrets
import time
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from igdit.config import ConfigError


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` when set (MLflow's own convention), else a sqlite file mlflow.db in this folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + str(Path("mlflow.db").resolve())


def open_store(uri: str) -> None:
    """Create a sqlite store's schema once, under a file lock: two processes creating it at once race on the
    schema migration ("duplicate column name"). Other stores (servers) need nothing."""
    if not uri.startswith("sqlite:///"):
        return
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    database = Path(uri[len("sqlite:///"):])
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(database) + ".lock"):
        MlflowClient(uri).search_experiments(max_results=1)


def check_store(uri: str, field: str = "trainer.logger.init_args.tracking_uri") -> None:
    """Open the tracking store a run is about to log into, or stop with a one-line ConfigError instead of a traceback
    from deep inside MLflow (a sqlite file it cannot create) or minutes of retries (a server nobody answers at).
    Called right before the run is created, so a store that opens is one the run would have created anyway."""
    if uri.startswith(("http://", "https://")):
        import requests

        try:  # any HTTP answer means a server is there; MLflow itself would retry for minutes
            requests.get(uri.rstrip("/") + "/health", timeout=10)
        except requests.RequestException as err:
            raise ConfigError(field, uri, f"no MLflow server answers there ({type(err).__name__}); start it "
                                          "(mlflow server --host 0.0.0.0 --port 5000) or log locally by leaving "
                                          "tracking_uri out (sqlite mlflow.db)") from None
        return
    try:
        if uri.startswith("sqlite:///"):
            open_store(uri)
        else:
            from mlflow.tracking import MlflowClient

            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # sqlite3/SQLAlchemy/MLflow errors: the store cannot be opened or created there
        reason = (" ".join(str(err).split()) or type(err).__name__).split(" (Background on this error")[0][:200]
        raise ConfigError(field, uri, f"the MLflow store cannot be opened ({reason}); point it at a folder this user "
                                      "can write (sqlite:///<folder>/mlflow.db) or at a tracking server") from None


def open_experiment(tracking_uri: Optional[str], name: str):
    """(client, experiment id) of the MLflow experiment ``name`` in ``tracking_uri`` (None: the default store, whose
    artifacts go beside it), created if it does not exist yet."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    open_store(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return client, experiment.experiment_id
    artifacts = None if tracking_uri else default_artifact_location()
    return client, client.create_experiment(name, artifact_location=artifacts)


def unique_run_name(experiment: str) -> str:
    """A run name no other run shares (MLflow's generated names come from the global random module, which a seeded
    run reseeds, so every run of a seeded experiment would get the same one)."""
    return f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def default_artifact_location() -> str:
    return Path("mlartifacts").resolve().as_uri()


class MLflowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger with igdit's defaults (sqlite store in the project folder).

    experiment_name: MLflow experiment; run_name: optional prefix of the run's name (made unique per run with the
    date and a random suffix; default: the experiment name); tracking_uri: None
    for $MLFLOW_TRACKING_URI or the local sqlite store, or e.g. "http://mlflow.cluster:5000"; artifact_location:
    where a NEW experiment keeps artifacts (default mlartifacts/ beside mlflow.db); run_id: log into this existing
    run (a resumed run is marked RUNNING again, then FINISHED). Nothing is created in the store before the run
    first logs, so a configuration refused at start leaves no run behind.
    """

    def __init__(self, experiment_name: str = "igdit", run_name: Optional[str] = None,
                 tracking_uri: Optional[str] = None, artifact_location: Optional[str] = None,
                 tags: Optional[dict[str, Any]] = None, run_id: Optional[str] = None):
        if tracking_uri is None:
            tracking_uri = default_tracking_uri()
            if tracking_uri.startswith("sqlite:///"):
                artifact_location = artifact_location or default_artifact_location()
        if run_id is None:  # a name a YAML fixes (st-stage2) names every run of it: it becomes the prefix
            run_name = unique_run_name(run_name or experiment_name)
        kwargs = dict(experiment_name=experiment_name, run_name=run_name, tracking_uri=tracking_uri,
                      artifact_location=artifact_location, tags=tags, log_model=False, run_id=run_id)
        # Lightning's constructor opens the store (and creates a sqlite file) at once; here the client is made when
        # the run first logs, on rank 0 only (Lightning's logger methods are rank-zero-only): a configuration
        # refused at start leaves no mlflow.db behind, and other ranks never touch the store.
        import mlflow.tracking

        real, mlflow.tracking.MlflowClient = mlflow.tracking.MlflowClient, _NoClient
        try:
            super().__init__(**kwargs)
        finally:
            mlflow.tracking.MlflowClient = real


    @property
    def experiment(self):
        if not self._initialized and rank_zero_only.rank == 0:  # other ranks get Lightning's dummy experiment
            from mlflow.tracking import MlflowClient

            open_store(self._tracking_uri)
            self._mlflow_client = MlflowClient(self._tracking_uri)
            before = os.environ.get("MLFLOW_TRACKING_URI")
            client = MLFlowLogger.experiment.fget(self)
            # mlflow.set_tracking_uri (which Lightning calls) exports the URI to the environment: the next run of
            # this process (a sweep's next trial, a test) would read it as the user's $MLFLOW_TRACKING_URI.
            if before is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = before
            if self._run_id is not None and client.get_run(self._run_id).info.status != "RUNNING":
                self.status_before = client.get_run(self._run_id).info.status
                client.update_run(self._run_id, status="RUNNING")  # a resumed run is running again
            return client
        return MLFlowLogger.experiment.fget(self)

    status_before: Optional[str] = None  # the status of a run this logger reopened, before it was running again

    @rank_zero_only
    def restore_status(self) -> None:
        """A command refused before training (a config error found at start): the run it reopened gets back the
        status it had (a FINISHED run stays FINISHED), instead of the FAILED that Lightning's exception handling
        left."""
        if self._initialized and self.status_before is not None:
            self.experiment.update_run(self._run_id, status=self.status_before)

    @rank_zero_only
    def close_as(self, status: str) -> None:
        """End the run with an MLflow status of Lightning's choice of none: KILLED for a run stopped by a signal."""
        if self._initialized:
            self.experiment.set_terminated(self._run_id, status)


class _NoClient:
    """Stands in for MlflowClient until the run first logs (on rank 0; other ranks never do)."""

    def __init__(self, tracking_uri: Optional[str] = None):
        self.tracking_uri = tracking_uri


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
        for n in itertools.count(1):  # a resumed run keeps the first config and adds the one it resumed with
            if not path.exists():
                break
            path = path.with_name(f"{Path(self.config_filename).stem}.resume-{n}.yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(path), skip_none=False, overwrite=False, multifile=False)
        logger = trainer.logger
        if isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(path))
