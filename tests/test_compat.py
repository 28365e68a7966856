"""Every private API of another library that igdit relies on (igdit/compat.py) still exists and does what igdit reads
it for: when an upgrade changes one, this file fails and names it, before a run does."""
import inspect

import pytest
import torch

from igdit import compat


def test_only_compat_reaches_into_other_libraries():
    """Private names of Lightning, torch and torch-fidelity appear in compat.py (and the logger subclass it lists)."""
    from pathlib import Path

    package = Path(compat.__file__).parent
    private = ("_average_model", "_given_hyperparameters_context", "_torch_fidelity_forward", "torch.optim._muon",
               "_shutdown_workers", "_t0s", "._experiment_name", "._tracking_uri")
    offenders = {str(p.relative_to(package)): [name for name in private if name in p.read_text()]
                 for p in package.rglob("*.py") if p.name != "compat.py"}
    assert {k: v for k, v in offenders.items() if v and k != "tracking.py"} == {}


def test_weight_averaging_keeps_its_averaged_copy_where_compat_reads_it():
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EMAWeightAveraging
    from torch.optim.swa_utils import AveragedModel

    callback = EMAWeightAveraging(decay=0.5)
    assert compat.averaged_model(callback) is None  # before setup
    trainer = pl.Trainer(max_steps=1, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 2)), batch_size=2)
    trainer.fit(Tiny(), data)
    average = compat.averaged_model(callback)
    assert isinstance(average, AveragedModel) and isinstance(average.module, pl.LightningModule)


def test_the_cli_context_records_hyperparameters():
    from helpers import model_config

    from igdit.module import build_module

    module = build_module(model_config())
    assert module.hparams["backbone"]["class_path"] == "igdit.models.SiT"  # recorded through given_hyperparameters
    with compat.given_hyperparameters({"a": 1}, "x.instantiate"):
        pass


def test_mlflow_logger_keeps_the_name_and_uri_it_was_given(tmp_path):
    from lightning.pytorch.loggers import MLFlowLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="compat", tracking_uri=uri)
    assert compat.mlflow_experiment_name(logger) == "compat" and compat.mlflow_tracking_uri(logger) == uri
    for attribute in ("_initialized", "_mlflow_client", "_run_id"):  # what igdit.tracking's subclass sets
        assert hasattr(logger, attribute), attribute


def test_throughput_monitor_keeps_a_clock_per_stage():
    from lightning.pytorch.callbacks import ThroughputMonitor

    assert isinstance(compat.throughput_clocks(ThroughputMonitor(batch_size_fn=len)), dict)


def test_torch_muon_is_the_functional_update_of_torch_optim_muon():
    muon = compat.torch_muon()
    parameters = set(inspect.signature(muon).parameters)
    assert {"params", "grads", "muon_momentum_bufs", "lr", "weight_decay", "momentum", "nesterov", "ns_steps",
            "adjust_lr_fn"} <= parameters, parameters


def test_fidelity_inception_returns_every_requested_feature_in_one_pass():
    from torchmetrics.image.fid import NoTrainInceptionV3

    assert hasattr(NoTrainInceptionV3, "_torch_fidelity_forward")
    assert callable(getattr(NoTrainInceptionV3, "_torch_fidelity_forward"))


def test_cli_override_of_the_checkpoint_hook_still_replaces_lightnings():
    from lightning.pytorch.cli import LightningCLI

    from igdit.experiment import IGDiTCLI

    assert hasattr(LightningCLI, "_parse_ckpt_path")  # the hook igdit replaces, so a checkpoint is read once, safely
    assert IGDiTCLI._parse_ckpt_path is not LightningCLI._parse_ckpt_path
