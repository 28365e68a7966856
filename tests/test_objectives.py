"""Loss terms: values, weights, schedules and what they ask the backbone for."""
import pytest
import torch
import torch.nn.functional as F

from igdit.config import ConfigError
from igdit.models.output import DiTOutput
from igdit.objectives import (DiffusionLoss, DiffusionLossConfig, ExitLoss, ExitLossConfig, LossInputs, Objective,
                              per_sample_loss)


def _inputs(step=0, t=None, exits=(2,)):
    g = torch.Generator().manual_seed(0)
    shape = (4, 1, 3, 3)
    target = torch.randn(shape, generator=g)
    out = DiTOutput(final=torch.randn(shape, generator=g),
                    exits={i: torch.randn(shape, generator=g) for i in exits})
    t = torch.tensor([0.1, 0.4, 0.6, 0.9]) if t is None else t
    return LossInputs(x=torch.zeros(shape), noise=torch.zeros(shape), t=t, x_t=torch.zeros(shape), target=target,
                      y=torch.zeros(4, dtype=torch.long), output=out, step=step)


def test_per_sample_loss_kinds():
    pred, target = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    torch.testing.assert_close(per_sample_loss(pred, target, "mse"), ((pred - target) ** 2).mean((1, 2)))
    torch.testing.assert_close(per_sample_loss(pred, target, "l1"), (pred - target).abs().mean((1, 2)))
    expected = F.smooth_l1_loss(pred, target, beta=0.3, reduction="none").mean((1, 2))
    torch.testing.assert_close(per_sample_loss(pred, target, "smooth_l1", beta=0.3), expected)


def test_total_is_final_mse_plus_half_exit_mse_by_default():
    inputs = _inputs()
    objective = Objective([DiffusionLoss(DiffusionLossConfig()), ExitLoss(ExitLossConfig(), (2,))])
    total, terms = objective(inputs)
    final = ((inputs.output.final - inputs.target) ** 2).mean()
    exit_ = ((inputs.output.exits[2] - inputs.target) ** 2).mean()
    torch.testing.assert_close(terms["diffusion"], final)
    torch.testing.assert_close(terms["ig_exit"], exit_)
    torch.testing.assert_close(total, final + 0.5 * exit_)


def test_several_exits_are_averaged():
    inputs = _inputs(exits=(2, 4))
    term = ExitLoss(ExitLossConfig(), (2, 4))
    expected = 0.5 * sum(((inputs.output.exits[i] - inputs.target) ** 2).mean() for i in (2, 4))
    torch.testing.assert_close(term(inputs), expected)


def test_schedule_switches_exit_head_off_outside_its_steps():
    objective = Objective([DiffusionLoss(DiffusionLossConfig()),
                           ExitLoss(ExitLossConfig(start_step=10, stop_step=20), (2,))])
    assert objective.exits_needed(0) == () and objective.exits_needed(9) == ()
    assert objective.exits_needed(10) == (2,) and objective.exits_needed(19) == (2,)
    assert objective.exits_needed(20) == ()
    _, terms = objective(_inputs(step=25))
    assert set(terms) == {"diffusion"}


def test_zero_weight_exit_term_asks_for_no_exit():
    objective = Objective([DiffusionLoss(DiffusionLossConfig()), ExitLoss(ExitLossConfig(weight=0.0), (2,))])
    assert objective.exits_needed(0) == ()


def test_t_range_masks_samples_outside():
    inputs = _inputs()
    term = ExitLoss(ExitLossConfig(t_range=(0.3, 0.7)), (2,))
    per = ((inputs.output.exits[2] - inputs.target) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(term(inputs), (per[1] + per[2]) / 4)


@pytest.mark.parametrize("config,field", [
    (ExitLossConfig(weight=-0.5), "model.exit_loss.weight"),
    (ExitLossConfig(loss="huber"), "model.exit_loss.loss"),
    (ExitLossConfig(start_step=5, stop_step=5), "model.exit_loss.stop_step"),
    (ExitLossConfig(t_range=(0.9, 0.1)), "model.exit_loss.t_range"),
])
def test_bad_exit_loss_values_name_the_field(config, field):
    with pytest.raises(ConfigError) as err:
        ExitLoss(config, (2,))
    message = str(err.value)
    assert message.startswith(field + ":") and "\n" not in message


def test_exit_loss_without_exits_is_refused():
    with pytest.raises(ConfigError, match="model.exits"):
        ExitLoss(ExitLossConfig(), ())
