"""The IG paper's training-acceleration loss (§4.3): the final head regresses x0 + omega * sg(D_f - D_i)."""
import pytest
import torch
import yaml
from jsonargparse import ArgumentError

from igdit.config import ConfigError, one_line
from igdit.models import SiT
from igdit.models.output import DiTOutput
from igdit.objectives import DiffusionLoss, IGAccelLoss, LossInputs, Objective
from igdit.transport import Transport

from helpers import REPO, tiny_module


def _attached(term, exits=(2,), path="linear"):
    backbone = SiT("T/2", input_size=8, in_channels=1, num_classes=10, exits=list(exits), depth=6)
    Objective({"ig_accel": term}).attach(backbone, Transport(path))
    return term


def _inputs(v_final=None, v_exit=None, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    shape = (4, 1, 2, 2)
    x, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9])
    x_t, target = Transport().interpolate(x, noise, t)
    v_final = torch.randn(shape, generator=g) if v_final is None else v_final
    v_exit = torch.randn(shape, generator=g) if v_exit is None else v_exit
    v_final, v_exit = v_final.requires_grad_(requires_grad), v_exit.requires_grad_(requires_grad)
    y = torch.zeros(4, dtype=torch.long)
    return LossInputs(x=x, noise=noise, t=t, x_t=x_t, target=target, y=y, y_clean=y,
                      output=DiTOutput(final=v_final, exits={2: v_exit}), step=0)


@pytest.mark.parametrize("loss", ["mse", "l1", "smooth_l1"])
def test_omega_zero_in_velocity_space_is_exactly_the_diffusion_loss(loss):
    inputs = _inputs()
    accel = _attached(IGAccelLoss(omega=0.0, space="v", loss=loss, beta=0.1))
    plain = DiffusionLoss(loss=loss, beta=0.1)
    assert torch.equal(accel(inputs), plain(inputs))


def test_the_default_is_the_papers_formula_in_x0_space():
    assert IGAccelLoss().space == "x0"
    inputs = _inputs()
    t = inputs.t
    plain = DiffusionLoss().per_sample(inputs)  # omega 0: the x0 loss is t^2 times the diffusion loss
    torch.testing.assert_close(_attached(IGAccelLoss(omega=0.0)).per_sample(inputs), t ** 2 * plain)


def test_the_final_target_is_v_plus_omega_times_the_gap_between_the_final_and_the_exit_head():
    # one sample, one pixel each: v = 1, v_f = 3, v_i = 2 -> target 1 + 0.5 * (3 - 2) = 1.5, loss (3 - 1.5)^2
    term = _attached(IGAccelLoss(omega=0.5, space="v"))
    inputs = _inputs()
    inputs.target = torch.full((4, 1, 2, 2), 1.0)
    inputs.output = DiTOutput(final=torch.full((4, 1, 2, 2), 3.0), exits={2: torch.full((4, 1, 2, 2), 2.0)})
    torch.testing.assert_close(term(inputs), torch.tensor(2.25))
    # and in general
    inputs = _inputs()
    v_f, v_i, v = inputs.output.final, inputs.output.exits[2], inputs.target
    torch.testing.assert_close(term(inputs), ((v_f - (v + 0.5 * (v_f - v_i))) ** 2).mean())


def test_x0_space_is_the_papers_formula_and_t_squared_times_the_v_loss_on_the_linear_path():
    inputs = _inputs()
    v_f, v_i, v, t, x_t = inputs.output.final, inputs.output.exits[2], inputs.target, inputs.t, inputs.x_t
    tt = t.view(-1, 1, 1, 1)
    d_f, d_i = x_t - tt * v_f, x_t - tt * v_i  # x0_hat = x_t - t v on the linear path
    paper = ((d_f - (inputs.x + 0.7 * (d_f - d_i))) ** 2).flatten(1).mean(1)
    x0 = _attached(IGAccelLoss(omega=0.7, space="x0"))
    v_space = _attached(IGAccelLoss(omega=0.7, space="v"))
    torch.testing.assert_close(x0.per_sample(inputs), paper)
    torch.testing.assert_close(x0.per_sample(inputs), t ** 2 * v_space.per_sample(inputs))


def test_x0_space_follows_the_transport_on_the_cosine_path():
    transport = Transport("cosine")
    inputs = _inputs()
    inputs.x_t, inputs.target = transport.interpolate(inputs.x, inputs.noise, inputs.t)
    d = lambda v: transport.velocity_to_data(v, inputs.x_t, inputs.t)  # noqa: E731
    d_f, d_i = d(inputs.output.final), d(inputs.output.exits[2])
    paper = ((d_f - (inputs.x + 0.3 * (d_f - d_i))) ** 2).flatten(1).mean(1)
    term = _attached(IGAccelLoss(omega=0.3, space="x0"), path="cosine")
    torch.testing.assert_close(term.per_sample(inputs), paper, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("space", ["v", "x0"])
def test_no_gradient_reaches_the_exit_output_through_the_stop_gradient(space):
    inputs = _inputs(requires_grad=True)
    term = _attached(IGAccelLoss(omega=0.5, space=space))
    term(inputs).backward()
    v_f, v_i, v = inputs.output.final, inputs.output.exits[2], inputs.target
    assert v_i.grad is None
    # d/dv_f of mean((v_f - T)^2) with T held fixed: 2 (v_f - T) / numel; in x0 space each sample's times t^2
    target = v + 0.5 * (v_f - v_i)
    scale = 1.0 if space == "v" else inputs.t.view(-1, 1, 1, 1) ** 2
    torch.testing.assert_close(v_f.grad, 2 * scale * (v_f - target).detach() / v_f.numel())


def test_with_only_this_term_the_exit_head_gets_no_gradient_and_the_final_head_does():
    module = tiny_module(terms={"ig_accel": {"class_path": "igdit.objectives.IGAccelLoss",
                                             "init_args": {"omega": 0.5}}})
    for head in (module.backbone.final_layer, module.backbone.exit_head(2)):  # make the zero-init heads speak
        for p in head.parameters():
            p.data.normal_(0, 0.05)
    assert module.objective.exits_needed(0) == (2,)
    loss, _ = module.compute_loss(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)), step=0)
    loss.backward()
    assert all(p.grad is None for p in module.backbone.exit_head(2).parameters())
    assert sum(p.grad.abs().sum() for p in module.backbone.final_layer.parameters()) > 0


@pytest.mark.parametrize("omega", [1.0, 1.5])
def test_omega_of_one_or_more_is_one_line_explaining_the_fixed_point(omega):
    with pytest.raises(ConfigError) as err:
        _attached(IGAccelLoss(omega=omega))
    message = one_line(err.value)
    assert message.startswith(f"model.terms.ig_accel.omega: {omega} is not allowed; expected omega < 1")
    assert "D_f = D_i + (E[x0|x_t] - D_i)/(1 - omega)" in message and "\n" not in message


def test_the_exit_head_it_reads_must_exist():
    assert _attached(IGAccelLoss(), exits=(2, 4)).exit == 2  # the first, as the IG sampling rule
    assert _attached(IGAccelLoss(exit=4), exits=(2, 4)).exits_needed(0) == (4,)
    with pytest.raises(ConfigError, match=r"^model.terms.ig_accel.exit: 3 is not allowed; the loss reads an exit head"):
        _attached(IGAccelLoss(exit=3))
    with pytest.raises(ConfigError, match=r"^model.terms.ig_accel.exit: None is not allowed; .*after blocks \[\]"):
        _attached(IGAccelLoss(), exits=())
    with pytest.raises((ConfigError, ArgumentError)) as err:
        tiny_module(terms={"ig_accel": {"class_path": "igdit.objectives.IGAccelLoss", "init_args": {"omega": -0.1}}})
    assert "omega" in one_line(err.value)


def test_the_digits_experiment_replaces_only_the_diffusion_term():
    default = yaml.safe_load((REPO / "experiments/default.yaml").read_text())["model"]["terms"]
    accel = yaml.safe_load((REPO / "experiments/ig_accel_digits.yaml").read_text())["model"]["terms"]
    assert set(accel) == {"ig_accel", "ig_exit"} and accel["ig_exit"] == default["ig_exit"]
    assert accel["ig_accel"]["init_args"]["omega"] < 1
    paper = yaml.safe_load((REPO / "experiments/sit_b2_ig_accel.yaml").read_text())
    reference = yaml.safe_load((REPO / "experiments/sit_b2_ig.yaml").read_text())
    assert set(paper["model"]["terms"]) == {"ig_accel", "ig_exit"}
    assert paper["model"]["backbone"] == reference["model"]["backbone"] and paper["data"] == reference["data"]
    assert paper["trainer"]["max_steps"] == reference["trainer"]["max_steps"] == 400_000
