"""LightningDiT's cosine velocity loss: the value by hand, its place in the objective, its gradient routing."""
import math

import pytest
import torch
from jsonargparse import ArgumentError

from igdit.config import ConfigError
from igdit.module import build_module
from igdit.objectives import cosine_velocity_loss

LDIT = {"class_path": "igdit.models.LightningDiT",
        "init_args": {"size": "T/1", "exits": [2], "input_size": 4, "in_channels": 4, "num_classes": 5,
                      "depth": 3, "hidden_size": 32, "num_heads": 2}}
TERMS = {"diffusion": {"class_path": "igdit.objectives.DiffusionLoss"},
         "ig_exit": {"class_path": "igdit.objectives.ExitLoss", "init_args": {"weight": 0.5}},
         "cosine": {"class_path": "igdit.objectives.CosineVelocityLoss"}}


def test_cosine_loss_by_hand():
    # one sample, 2 channels, 1 x 2 positions: position 0 pred (1, 0) vs target (1, 1) -> cos = 1/sqrt(2);
    # position 1 pred (0, 2) vs target (0, -3) -> cos = -1. Mean over positions of 1 - cos.
    pred = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])
    target = torch.tensor([[[[1.0, 0.0]], [[1.0, -3.0]]]])
    expected = ((1 - 1 / math.sqrt(2)) + (1 - (-1))) / 2
    assert cosine_velocity_loss(pred, target).tolist() == pytest.approx([expected], abs=1e-6)
    # the cosine runs over channels, not over positions: scaling one position's vector changes nothing
    scaled = pred.clone()
    scaled[..., 1] *= 7
    assert torch.allclose(cosine_velocity_loss(scaled, target), cosine_velocity_loss(pred, target))
    # both vectors negated (LightningDiT's u = data - noise against igdit's v = noise - data): same loss
    assert torch.equal(cosine_velocity_loss(-pred, -target), cosine_velocity_loss(pred, target))


def test_official_formula_on_random_tensors():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 32, 4, 4, generator=g), torch.randn(3, 32, 4, 4, generator=g)
    cos = (pred * target).sum(1) / (pred.norm(dim=1) * target.norm(dim=1))
    assert torch.allclose(cosine_velocity_loss(pred, target), (1 - cos).mean(dim=(1, 2)), atol=1e-6)


def test_composes_with_diffusion_and_exit_loss_and_reads_only_the_final_head():
    module = build_module({"backbone": LDIT, "terms": TERMS})
    with torch.no_grad():  # the final head starts at zero (no cosine defined): give it weights
        for p in module.backbone.final_layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, 4, 4), torch.randint(0, 5, (6,))
    total, values = module.compute_loss(x, y, step=0)
    assert set(values) == {"diffusion", "ig_exit", "cosine"}
    assert torch.allclose(total, values["diffusion"] + 0.5 * values["ig_exit"] + values["cosine"])
    assert 0 < values["cosine"] < 2

    # gradient routing: the cosine term alone sends no gradient into the exit head
    cosine = build_module({"backbone": LDIT, "terms": {"cosine": TERMS["cosine"]}})
    cosine.backbone.load_state_dict(module.backbone.state_dict())
    loss, _ = cosine.compute_loss(x, y, step=0)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in cosine.backbone.final_layer_xr.parameters())
    assert cosine.backbone.final_layer.linear.weight.grad.abs().sum() > 0


def test_negative_weight_is_refused():
    with pytest.raises((ConfigError, ArgumentError), match="weight"):
        build_module({"backbone": LDIT, "terms": {"cosine": {"class_path": "igdit.objectives.CosineVelocityLoss",
                                                             "init_args": {"weight": -1.0}}}})
