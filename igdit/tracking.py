"""MLflow as the default logger, the run folder that holds a run's checkpoints, config and grids, and what every
run records about where its numbers come from.

Default store: a sqlite file `mlflow.db` in the folder the run starts from (no server needed; since
MLflow 3.7 the file store is on its way out), artifacts in `mlartifacts/` beside it. `$MLFLOW_TRACKING_URI` or
`tracking_uri` name another store: a sqlite file keeps its artifacts in `mlartifacts/` beside that file, a server
its own artifact root (the right choice for multi-node runs: sqlite on a network disk is fragile).

Every run (fit, eval, sweep trial, study run) carries its provenance as tags (``provenance_tags``): the git commit
of the checkout igdit runs from (``mlflow.source.git.commit``, shown by the MLflow UI), whether it had uncommitted
changes, and the versions of igdit, Python, torch, Lightning and MLflow.
"""
from __future__ import annotations

import functools
import itertools
import os
import secrets
import time
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from igdit.compat import mlflow_experiment_name
from igdit.config import ConfigError

VERSIONED = ("igdit", "torch", "lightning", "mlflow", "optuna", "numpy", "scipy")


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
        import urllib.error
        import urllib.request

        try:  # any HTTP answer means a server is there; MLflow itself would retry for minutes
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
        except urllib.error.HTTPError:
            pass  # it answered, with an error status: a server is there
        except OSError as err:  # URLError, refused, timed out
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
    """(client, experiment id) of the MLflow experiment ``name`` in ``tracking_uri`` (None: the default store),
    created if it does not exist yet, with its artifacts beside a sqlite store (``artifact_location``)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    open_store(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return client, experiment.experiment_id
    return client, client.create_experiment(name, artifact_location=default_artifact_location(uri))


def unique_run_name(experiment: str) -> str:
    """A run name no other run shares (MLflow's generated names come from the global random module, which a seeded
    run reseeds, so every run of a seeded experiment would get the same one)."""
    return f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def default_artifact_location(tracking_uri: str) -> Optional[str]:
    """Where a new experiment of the store ``tracking_uri`` keeps its artifacts: ``mlartifacts/`` beside a sqlite
    file (MLflow would use ./mlruns of whatever folder the command runs in); None for any other store, which has
    its own artifact root (a server's ``--artifacts-destination``, a file store's own folder)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


@functools.lru_cache(maxsize=1)
def provenance() -> dict:
    """What produced the numbers: the git commit of the checkout igdit runs from (``git_commit``; None outside a
    checkout, e.g. an installed wheel), whether it had uncommitted changes, the versions of the packages that
    compute them, and the machine. ``commit`` says both in words ("<sha> (with uncommitted changes)", "unknown")."""
    import platform
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    root = Path(__file__).resolve().parents[1]  # the folder that holds the igdit package
    sha, dirty = None, False
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        # a package installed into a virtual environment that lies inside some other checkout is not that checkout
        if top and Path(top).resolve() == root:
            sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=10).stdout.strip() or None
            dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                        capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return {"git_commit": sha, "dirty": dirty,
            "commit": "unknown" if sha is None else sha + (" (with uncommitted changes)" if dirty else ""),
            "versions": versions, "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                                             f"{platform.system()} {platform.release()}, Python "
                                             f"{platform.python_version()}"}


def provenance_tags(role: Optional[str] = None) -> dict[str, str]:
    """MLflow tags of ``provenance()``: ``mlflow.source.git.commit`` (the UI's "Git commit"; only in a checkout),
    ``igdit.git_dirty``, ``versions.<package>``, ``igdit.machine`` and, given, ``igdit.role`` (fit, evaluation,
    trial, study, training)."""
    found = provenance()
    tags = {f"versions.{name}": value for name, value in found["versions"].items()}
    tags["igdit.machine"] = found["machine"]
    if found["git_commit"]:
        tags["mlflow.source.git.commit"] = found["git_commit"]
        tags["igdit.git_dirty"] = str(found["dirty"]).lower()
    if role is not None:
        tags["igdit.role"] = role
    return tags


def set_tags(client, run_id: str, tags: dict[str, Any]) -> None:
    """All of ``tags`` in one request."""
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(key, str(value)[:5000]) for key, value in tags.items()])


def log_new_params(client, run_id: str, params: dict[str, Any]) -> dict[str, Any]:
    """Log the ``params`` the run does not have yet, and return them. MLflow refuses to change a parameter, and a
    resumed run (``--ckpt_path last --trainer.max_steps 80``) may legitimately change its trainer settings: the
    first value stays, and the run folder's ``config.resume-<n>.yaml`` has the new one."""
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    new = {key: value for key, value in params.items() if key not in existing}
    items = [Param(key, str(value)[:6000]) for key, value in new.items()]
    for start in range(0, len(items), 100):  # MLflow's limit per request
        client.log_batch(run_id, params=items[start:start + 100])
    return new


def trainer_params(config: dict, trainer=None) -> dict[str, Any]:
    """The trainer settings of a resolved experiment config as MLflow params (``trainer/max_steps``,
    ``trainer/precision``, ``trainer/devices``, ..., ``trainer/callbacks`` as class names, ``seed_everything``) and,
    given the built trainer, what they resolved to (``trainer/world_size``, ``trainer/device_type``)."""
    section = dict(config.get("trainer") or {})
    params: dict[str, Any] = {}
    for key, value in sorted(section.items()):
        if key == "logger" or value is None:  # None: Lightning's default, which the config did not set
            continue
        if key == "callbacks":
            value = [str(c.get("class_path", c)).rsplit(".", 1)[-1] if isinstance(c, dict) else type(c).__name__
                     for c in value or []]
        elif isinstance(value, dict):
            value = value.get("class_path", value)
        params[f"trainer/{key}"] = value
    if "seed_everything" in config:
        params["seed_everything"] = config["seed_everything"]
    if trainer is not None:
        params["trainer/world_size"] = trainer.world_size
        params["trainer/device_type"] = trainer.strategy.root_device.type
    return params


class MLflowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger with igdit's defaults (sqlite store in the project folder).

    experiment_name: MLflow experiment; run_name: optional prefix of the run's name (made unique per run with the
    date and a random suffix; default: the experiment name); tracking_uri: None
    for $MLFLOW_TRACKING_URI or the local sqlite store, or e.g. "http://mlflow.cluster:5000"; artifact_location:
    where a NEW experiment keeps artifacts (default: mlartifacts/ beside a sqlite store, a server's own root);
    run_id: log into this existing run (a resumed run is marked RUNNING again, then FINISHED). Nothing is created
    in the store before the run first logs, so a configuration refused at start leaves no run behind.
    """

    def __init__(self, experiment_name: str = "igdit", run_name: Optional[str] = None,
                 tracking_uri: Optional[str] = None, artifact_location: Optional[str] = None,
                 tags: Optional[dict[str, Any]] = None, run_id: Optional[str] = None):
        tracking_uri = tracking_uri or default_tracking_uri()
        artifact_location = artifact_location or default_artifact_location(tracking_uri)
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

    def name_run(self, name: str, tags: dict[str, Any]) -> None:
        """Name the run and add ``tags`` to it, before it is created (``igdit eval`` names its run after the
        checkpoint it scores); a run that exists already (``run_id``) only gets the tags."""
        self.tags = {**(self.tags or {}), **{key: str(value) for key, value in tags.items()}}
        if self._run_id is None:
            self._run_name = name
        elif self._initialized and rank_zero_only.rank == 0:
            set_tags(self.experiment, self._run_id, self.tags)

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
        name, run = mlflow_experiment_name(logger), logger.run_id
    else:
        name, run = getattr(logger, "name", None) or "default", f"version_{getattr(logger, 'version', 0)}"
    return Path(trainer.default_root_dir) / str(name) / str(run)


class RunConfigSaver(SaveConfigCallback):
    """Writes the resolved config into the run folder and attaches it to the MLflow run, with the run's
    provenance (``provenance_tags``) and the trainer settings as parameters.

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
            import yaml

            client, run_id = logger.experiment, logger.run_id
            client.log_artifact(run_id, str(path))
            record_provenance(client, run_id, "fit" if stage == "fit" else "evaluation")
            config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
            log_new_params(client, run_id, trainer_params(config, trainer))


def record_provenance(client, run_id: str, role: Optional[str] = None) -> None:
    """Tag the run with ``provenance_tags`` (and ``role`` unless it has one). A run resumed by other code keeps the
    commit it started at; the commit that resumed it is ``igdit.resumed.git_commit``."""
    tags = client.get_run(run_id).data.tags
    new = provenance_tags(None if "igdit.role" in tags else role)
    first = tags.get("mlflow.source.git.commit")
    if first and new.get("mlflow.source.git.commit") not in (None, first) and "igdit.git_dirty" in tags:
        new["igdit.resumed.git_commit"] = new.pop("mlflow.source.git.commit")
    set_tags(client, run_id, new)
