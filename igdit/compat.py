"""The private APIs of other libraries that igdit relies on, each in one place, because no public one does the job.

Each function names the library versions it was checked against; ``tests/test_compat.py`` fails loudly, naming the
function, when one of them changes. Everything else in igdit uses public APIs only.

- Lightning 2.6 (checked 2.6.0 – 2.6.6): the EMA copy that ``WeightAveraging`` keeps (``_average_model``); the
  context the LightningCLI records a module's config in (``_given_hyperparameters_context``); the experiment name
  and tracking URI an ``MLFlowLogger`` was given (``_experiment_name``, ``_tracking_uri``: its public ``name`` is
  the experiment *id*); the training clock of ``ThroughputMonitor`` (``_t0s``); and ``LightningCLI._parse_ckpt_path``,
  which igdit.experiment overrides so that a checkpoint is read safely once. igdit.tracking's logger subclass also
  reads and sets ``MLFlowLogger``'s ``_initialized``, ``_mlflow_client``, ``_run_id`` and ``_tracking_uri`` to open
  its store lazily on rank 0.
- torch (checked 2.9 – 2.14): ``torch.optim._muon.muon``, the functional update ``torch.optim.Muon.step`` runs,
  which MuonWithAuxAdam applies to its own parameter groups (torch.optim.Muon takes 2-D parameters only).
- torch-fidelity (checked 0.3 – 0.4): ``_torch_fidelity_forward`` of torchmetrics' ``NoTrainInceptionV3``, the
  pass that returns every requested feature (its ``forward`` returns the first only), so FID and the Inception
  Score share one Inception pass.
"""
from __future__ import annotations

from typing import Any, Callable

LIGHTNING_CHECKED = "2.6.0 – 2.6.6"
TORCH_CHECKED = "2.9 – 2.14"
TORCH_FIDELITY_CHECKED = "0.3 – 0.4"


def averaged_model(weight_averaging) -> Any:
    """The ``torch.optim.swa_utils.AveragedModel`` a Lightning ``WeightAveraging`` callback keeps (None before it
    is set up); ``.module`` is the averaged copy of the LightningModule."""
    return weight_averaging._average_model


def given_hyperparameters(hparams: dict, instantiator: str):
    """The context in which a LightningModule built inside it records ``hparams`` as its hyper-parameters, as the
    LightningCLI records a module's config (so its checkpoints reload with ``load_from_checkpoint``)."""
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

    return _given_hyperparameters_context(hparams=hparams, instantiator=instantiator)


def mlflow_experiment_name(logger) -> str:
    """The experiment name an MLFlowLogger was given (its public ``name`` is the experiment id)."""
    return logger._experiment_name


def mlflow_tracking_uri(logger) -> str:
    """The tracking URI an MLFlowLogger was given."""
    return logger._tracking_uri


def throughput_clocks(monitor) -> dict:
    """ThroughputMonitor's start time per running stage, which its samples/s are measured from."""
    return monitor._t0s


def torch_muon() -> Callable:
    """torch's functional Muon update (``torch.optim._muon.muon``)."""
    from torch.optim._muon import muon

    return muon


def inception_all_features(net, images):
    """Every feature ``NoTrainInceptionV3`` was asked for, from one pass (its ``forward`` returns the first)."""
    return net._torch_fidelity_forward(images)
