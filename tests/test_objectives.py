"""Loss terms: values, weights, schedules and what they ask the backbone for."""
import pytest
import torch
import torch.nn.functional as F
from jsonargparse import ArgumentError

from igdit.config import ConfigError, one_line
from igdit.models import SiT
from igdit.models.output import DiTOutput
from igdit.objectives import DiffusionLoss, ExitLoss, LossInputs, Objective, per_sample_loss
from igdit.transport import Transport

from helpers import model_config, tiny_module


def _inputs(step=0, t=None, exits=(2,)):
    g = torch.Generator().manual_seed(0)
    shape = (4, 1, 3, 3)
    target = torch.randn(shape, generator=g)
    out = DiTOutput(final=torch.randn(shape, generator=g),
                    exits={i: torch.randn(shape, generator=g) for i in exits})
    t = torch.tensor([0.1, 0.4, 0.6, 0.9]) if t is None else t
    y = torch.zeros(4, dtype=torch.long)
    return LossInputs(x=torch.zeros(shape), noise=torch.zeros(shape), t=t, x_t=torch.zeros(shape), target=target,
                      y=y, y_clean=y, output=out, step=step)


def _objective(terms, exits=(2,)):
    objective = Objective(terms)
    backbone = SiT("T/2", input_size=8, in_channels=1, num_classes=10, exits=list(exits), depth=6)
    objective.attach(backbone, Transport())
    return objective


def test_per_sample_loss_kinds():
    pred, target = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    torch.testing.assert_close(per_sample_loss(pred, target, "mse"), ((pred - target) ** 2).mean((1, 2)))
    torch.testing.assert_close(per_sample_loss(pred, target, "l1"), (pred - target).abs().mean((1, 2)))
    expected = F.smooth_l1_loss(pred, target, beta=0.3, reduction="none").mean((1, 2))
    torch.testing.assert_close(per_sample_loss(pred, target, "smooth_l1", beta=0.3), expected)


def test_total_is_final_mse_plus_half_exit_mse_by_default():
    inputs = _inputs()
    objective = _objective({"diffusion": DiffusionLoss(), "ig_exit": ExitLoss()})
    total, terms = objective(inputs)
    final = ((inputs.output.final - inputs.target) ** 2).mean()
    exit_ = ((inputs.output.exits[2] - inputs.target) ** 2).mean()
    torch.testing.assert_close(terms["diffusion"], final)
    torch.testing.assert_close(terms["ig_exit"], exit_)
    torch.testing.assert_close(total, final + 0.5 * exit_)


def test_several_exits_are_averaged():
    inputs = _inputs(exits=(2, 4))
    objective = _objective({"ig_exit": ExitLoss()}, exits=(2, 4))
    expected = 0.5 * sum(((inputs.output.exits[i] - inputs.target) ** 2).mean() for i in (2, 4))
    torch.testing.assert_close(objective["ig_exit"](inputs), expected)


def test_schedule_switches_exit_head_off_outside_its_steps():
    objective = _objective({"diffusion": DiffusionLoss(), "ig_exit": ExitLoss(start_step=10, stop_step=20)})
    assert objective.exits_needed(0) == () and objective.exits_needed(9) == ()
    assert objective.exits_needed(10) == (2,) and objective.exits_needed(19) == (2,)
    assert objective.exits_needed(20) == ()
    _, terms = objective(_inputs(step=25))
    assert set(terms) == {"diffusion"}


def test_zero_weight_exit_term_asks_for_no_exit():
    objective = _objective({"diffusion": DiffusionLoss(), "ig_exit": ExitLoss(weight=0.0)})
    assert objective.exits_needed(0) == ()


def test_t_range_masks_samples_outside():
    inputs = _inputs()
    objective = _objective({"ig_exit": ExitLoss(t_range=(0.3, 0.7))})
    per = ((inputs.output.exits[2] - inputs.target) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(objective["ig_exit"](inputs), (per[1] + per[2]) / 4)


def test_terms_are_named_by_their_key_and_logged_under_it():
    objective = _objective({"flow": DiffusionLoss(), "head": ExitLoss()})
    _, values = objective(_inputs())
    assert set(values) == {"flow", "head"} and objective["head"].name == "head"


@pytest.mark.parametrize("term,field", [
    ({"weight": -0.5}, "model.terms[ExitLoss].weight"),
    ({"loss": "huber"}, "model.terms[ExitLoss].loss"),
    ({"start_step": 5, "stop_step": 5}, "stop_step"),
    ({"t_range": [0.9, 0.1]}, "t_range"),
    ({"exits": [3]}, "model.terms.ig_exit.exits"),
])
def test_bad_exit_loss_values_name_the_field(term, field):
    terms = model_config()["terms"]
    terms["ig_exit"]["init_args"].update(term)
    with pytest.raises((ConfigError, ArgumentError)) as err:
        tiny_module(terms=terms)
    message = one_line(err.value)
    assert field in message and "\n" not in message


def test_exit_loss_without_exits_is_refused():
    with pytest.raises(ConfigError, match="model.terms.ig_exit.weight.*model.backbone.exits"):
        tiny_module(backbone={"exits": []})


def test_without_terms_the_module_trains_the_papers_objective():
    with_exit = tiny_module(terms=None)
    assert list(with_exit.objective) == ["diffusion", "ig_exit"] and with_exit.objective["ig_exit"].weight == 0.5
    assert list(tiny_module(terms=None, backbone={"exits": []}).objective) == ["diffusion"]
