"""How a term's t_range counts: ``per_sample`` (samples outside the range are zero in the batch mean) and
``official_broadcast`` (what the public Self-Transcendence code computes: its (B,) per-sample loss times a
(B, 1, 1, 1) mask broadcasts to (B, 1, 1, B), whose mean is the in-range fraction times the mean over every sample);
and the ST teacher's precision."""
import pytest
import torch

from igdit.models.output import DiTOutput
from igdit.objectives import DispersiveLoss, LossInputs, LossTerm, dispersive_loss

from test_self_transcendence import NULL, _student, teacher_ckpt  # noqa: F401  (the fixture)


class Fixed(LossTerm):
    """A term whose per-sample losses are given (to check the reduction alone)."""

    def __init__(self, losses: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        self.losses = losses

    def per_sample(self, inputs):
        return self.losses


def _inputs(t: torch.Tensor) -> LossInputs:
    n = len(t)
    zeros = torch.zeros(n, 1, 2, 2)
    y = torch.zeros(n, dtype=torch.long)
    return LossInputs(x=zeros, noise=zeros, t=t, x_t=zeros, target=zeros, y=y, y_clean=y, output=None, step=0)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.dim())))


def official(per_element: torch.Tensor, t: torch.Tensor, low: float = 0.4, high: float = 0.7) -> torch.Tensor:
    """The public code's reduction, transcribed: ``(mean_flat(loss) * t_mask).mean()`` with t_mask (B, 1, 1, 1)."""
    t_mask = ((t >= low) & (t <= high)).float().view(-1, 1, 1, 1)
    return (mean_flat(per_element) * t_mask).mean()


def test_the_issues_reproduction_by_hand():
    losses, t = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.1, 0.9])  # only the first inside [0.4, 0.7]
    per_sample = Fixed(losses, t_range=(0.4, 0.7))
    broadcast = Fixed(losses, t_range=(0.4, 0.7), t_range_mode="official_broadcast")
    assert per_sample(_inputs(t)).item() == pytest.approx(1 / 3)       # (1 + 0 + 0) / 3
    assert broadcast(_inputs(t)).item() == pytest.approx(2 / 3)        # 1/3 of the batch inside x mean(1, 2, 3)
    mask = torch.tensor([True, False, False]).view(-1, 1, 1, 1)
    assert (losses * mask).mean().item() == pytest.approx(broadcast(_inputs(t)).item())  # the broadcast itself
    # a full range: both modes are the plain batch mean
    for mode in ("per_sample", "official_broadcast"):
        assert Fixed(losses, t_range_mode=mode)(_inputs(t)).item() == pytest.approx(2.0)


def test_a_bad_mode_is_refused_by_the_cli_types():
    from jsonargparse import ArgumentError

    from helpers import tiny_module

    with pytest.raises(ArgumentError, match="t_range_mode"):
        tiny_module(terms={"diffusion": {"class_path": "igdit.objectives.DiffusionLoss",
                                         "init_args": {"t_range": [0.4, 0.7], "t_range_mode": "broadcast"}}})


@pytest.mark.parametrize("target", ["v", "x0"])
def test_vae_align_under_official_broadcast_equals_the_public_formula(target):
    from helpers import tiny_module

    module = tiny_module(terms={"vae_align": {"class_path": "igdit.objectives.VAEAlignLoss", "init_args": {
        "block": 1, "projector_dim": 32, "target": target, "t_range_mode": "official_broadcast"}}})
    term = module.objective["vae_align"]
    g = torch.Generator().manual_seed(0)
    n = 64
    x, noise, hidden = torch.randn(n, 1, 8, 8, generator=g), torch.randn(n, 1, 8, 8, generator=g), \
        torch.randn(n, 16, 128, generator=g)
    t = torch.rand(n, generator=g)
    x_t, v = module.transport.interpolate(x, noise, t)
    y = torch.zeros(n, dtype=torch.long)
    inputs = LossInputs(x=x, noise=noise, t=t, x_t=x_t, target=v, y=y, y_clean=y,
                        output=DiTOutput(final=None, hidden={1: hidden}), step=0, backbone=module.backbone)
    prediction = term.predict(hidden, module.backbone)
    expected = official((prediction - (v if target == "v" else x)) ** 2, t)
    torch.testing.assert_close(term(inputs), expected, rtol=1e-6, atol=1e-7)
    per_sample = mean_flat((prediction - (v if target == "v" else x)) ** 2)
    inside = (t >= 0.4) & (t <= 0.7)
    assert 0 < inside.sum() < n and not torch.isclose(expected, (per_sample * inside).mean())


def _student_inputs(module, n=32, seed=3):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(n, 1, 8, 8, generator=g)
    hidden = torch.randn(n, 16, 128, generator=g, requires_grad=True)
    t = torch.linspace(0.02, 0.98, n)
    y = torch.randint(0, 10, (n,), generator=g)
    zeros = torch.zeros_like(x_t)
    return LossInputs(x=zeros, noise=zeros, t=t, x_t=x_t, target=zeros, y=y, y_clean=y,
                      output=DiTOutput(final=None, hidden={3: hidden}), step=0, backbone=module.backbone)


def _f_g(term, inputs):
    teacher = term.teacher.net
    with torch.no_grad():
        f_c = teacher(inputs.x_t, inputs.t, inputs.y_clean, hidden=(4,)).hidden[4]
        f_u = teacher(inputs.x_t, inputs.t, torch.full_like(inputs.y_clean, NULL), hidden=(4,)).hidden[4]
    return f_u + term.omega * (f_c - f_u)


def test_self_guided_under_official_broadcast_equals_the_public_formula_and_the_teacher_sees_every_sample(
        teacher_ckpt):  # noqa: F811
    from test_self_transcendence import Calls

    module = _student(teacher_ckpt, omega=30.0, t_range_mode="official_broadcast")
    term = module.objective["self_guided"]
    inputs = _student_inputs(module)
    calls = Calls(term.teacher.net)
    value = term(inputs)
    (x, t, _), _ = calls.forwards[0]
    assert len(t) == 2 * len(inputs.t)  # every sample, both branches, in one pass
    prediction = term.projector(inputs.output.hidden[3])
    expected = official((prediction - _f_g(term, inputs)) ** 2, inputs.t)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)


def test_under_official_broadcast_samples_outside_the_range_get_gradient_and_under_per_sample_none(teacher_ckpt):  # noqa: F811
    for mode in ("per_sample", "official_broadcast"):
        module = _student(teacher_ckpt, t_range_mode=mode)
        term = module.objective["self_guided"]
        inputs = _student_inputs(module)
        term(inputs).backward()
        grad = inputs.output.hidden[3].grad.flatten(1).abs().sum(1)
        outside = (inputs.t < 0.4) | (inputs.t > 0.7)
        assert (grad[~outside] > 0).all()
        if mode == "per_sample":
            assert (grad[outside] == 0).all()
        else:
            assert (grad[outside] > 0).all()


def test_dispersive_under_official_broadcast_is_the_whole_batch_loss_times_the_fraction_inside():
    torch.manual_seed(0)
    z, t = torch.randn(10, 4, 8), torch.linspace(0.0, 1.0, 10)
    inside = (t >= 0.3) & (t <= 0.6)
    inputs = _inputs(t)
    inputs.output = DiTOutput(final=None, hidden={1: z})
    per_sample = DispersiveLoss(block=1, t_range=(0.3, 0.6))
    broadcast = DispersiveLoss(block=1, t_range=(0.3, 0.6), t_range_mode="official_broadcast")
    torch.testing.assert_close(per_sample(inputs), dispersive_loss(z[inside], 0.5))
    torch.testing.assert_close(broadcast(inputs), dispersive_loss(z, 0.5) * inside.float().mean())


@pytest.mark.parametrize("precision,dtype", [("float32", torch.float32), ("trainer", torch.bfloat16)])
def test_the_teacher_runs_in_float32_under_bf16_autocast_unless_told_otherwise(teacher_ckpt, precision, dtype):  # noqa: F811
    module = _student(teacher_ckpt, teacher_precision=precision, t_range=[0.0, 1.0])
    term = module.objective["self_guided"]
    seen = []  # the dtype each of the teacher's linear layers computes in
    for layer in term.teacher.net.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    x_t, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.randint(0, 10, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f_g = term.guided_features(x_t, t, y)
    assert seen and set(seen) == {dtype}
    assert f_g.dtype == torch.float32  # the target the student's float32 loss reads
    exact = term.guided_features(x_t, t, y)  # no autocast at all
    if precision == "float32":
        assert torch.equal(f_g, exact)
    else:  # omega 30 multiplies the bf16 rounding of f_c - f_u
        assert not torch.equal(f_g, exact)
