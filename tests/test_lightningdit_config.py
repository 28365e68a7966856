"""experiments/lightningdit_xl1_ig.yaml carries the paper's settings (docs/method.md §4.2) and builds the official
model, loss and optimiser split."""
from pathlib import Path

import torch
import yaml

from igdit.module import build_module
from igdit.objectives import CosineVelocityLoss, DiffusionLoss, ExitLoss
from igdit.optim import MuonWithAuxAdam

REPO = Path(__file__).resolve().parents[1]


def test_paper_settings():
    cfg = yaml.safe_load((REPO / "experiments/lightningdit_xl1_ig.yaml").read_text())
    backbone = cfg["model"]["backbone"]["init_args"]
    assert (backbone["size"], backbone["exits"], backbone["input_size"], backbone["in_channels"]) == ("XL/1", [8], 16, 32)
    assert backbone["use_rope"] and backbone["use_rmsnorm"] and backbone["use_swiglu"] and not backbone["qk_norm"]
    terms = cfg["model"]["terms"]
    assert terms["ig_exit"]["init_args"] == {"weight": 0.5, "loss": "mse"}
    assert terms["cosine"]["class_path"] == "igdit.objectives.CosineVelocityLoss" and terms["cosine"]["init_args"]["weight"] == 1
    optimizer = cfg["model"]["optimizer"]
    assert optimizer["class_path"] == "igdit.optim.MuonWithAuxAdam"
    assert {k: optimizer["init_args"][k] for k in ("lr", "momentum", "weight_decay", "ns_steps", "adam_betas")} == \
        {"lr": 2e-4, "momentum": 0.95, "weight_decay": 0.01, "ns_steps": 5, "adam_betas": [0.9, 0.95]}
    assert "lr_scheduler" not in cfg["model"]  # constant lr
    assert cfg["data"]["batch_size"] == 256 and cfg["trainer"]["gradient_clip_val"] == 1.0
    assert cfg["trainer"]["max_steps"] == 3_000_000 and cfg["trainer"]["precision"] == "bf16-mixed"
    assert cfg["model"]["transport"]["time_sampling"] == "uniform" and cfg["model"]["class_dropout"] == 0.1
    ema = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("EMAWeightAveraging"))
    assert ema["init_args"]["decay"] == 0.9999


def test_builds_the_official_model_and_optimiser_split():
    cfg = yaml.safe_load((REPO / "experiments/lightningdit_xl1_ig.yaml").read_text())["model"]
    with torch.device("meta"):  # 678M parameters, no memory
        module = build_module(cfg)
        optimizer = module.configure_optimizers()
    assert sum(p.numel() for p in module.backbone.parameters()) == 677_951_296  # the official count
    assert [type(t) for t in module.objective.values()] == [DiffusionLoss, ExitLoss, CosineVelocityLoss]
    assert isinstance(optimizer, MuonWithAuxAdam)
    muon, adam = (sum(p.numel() for p in g["params"]) for g in optimizer.param_groups)
    assert [g["use_muon"] for g in optimizer.param_groups] == [True, False]
    # everything but biases, RMSNorm gains and the frozen pos_embed is orthogonalised by Muon
    one_d = sum(p.numel() for p in module.parameters() if p.requires_grad and p.ndim < 2)
    assert adam == one_d and muon + adam + module.backbone.pos_embed.numel() == 677_951_296
