"""Samplers recover a known Gaussian target from its exact velocity field (no network)."""
import pytest
import torch

from igdit.config import ConfigError
from igdit.guidance import Autoguidance, ClassifierFreeGuidance, Denoiser, InternalGuidance
from igdit.models import build_backbone
from igdit.models.output import DiTOutput
from igdit.samplers import (euler_maruyama_sde, euler_ode, heun_ode, run_sampler, sde_grid, shifted_grid, time_grid,
                            uniform_grid)
from igdit.transport import Transport

MU, STD = 1.5, 0.5


class GaussianVelocity(torch.nn.Module):
    """Exact velocity of the linear path (t = 1 noise) when the data is N(MU, STD^2) in every dimension."""

    num_classes, latent_shape, exit_indices = 1, (1, 4, 4), ()

    def forward(self, x, t, y, exits=(), hidden=()):
        t = t.view(-1, 1, 1, 1).to(x.dtype)
        var_t = (1 - t) ** 2 * STD**2 + t**2
        centred = x - (1 - t) * MU
        x0 = MU + (1 - t) * STD**2 / var_t * centred  # E[x | x_t]
        eps = t / var_t * centred                      # E[eps | x_t]
        return DiTOutput(final=eps - x0)


def _noise(n=4000):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64), torch.zeros(n, dtype=torch.long)


@pytest.mark.parametrize("sampler,steps,tol", [(euler_ode, 200, 0.03), (heun_ode, 30, 0.02)])
def test_ode_samplers_recover_gaussian_mean_and_std(sampler, steps, tol):
    noise, y = _noise()
    x, nfe = sampler(Denoiser(GaussianVelocity()), noise, y, uniform_grid(steps))
    assert abs(x.mean().item() - MU) < tol and abs(x.std().item() - STD) < tol
    assert nfe == (steps if sampler is euler_ode else 2 * steps - 1)


def test_sde_sampler_recovers_gaussian_mean_and_std():
    noise, y = _noise()
    g = torch.Generator().manual_seed(1)
    x, nfe = euler_maruyama_sde(Denoiser(GaussianVelocity()), Transport("linear"), noise, y, sde_grid(250),
                                step_noise=lambda: torch.randn(noise.shape, generator=g, dtype=torch.float64))
    assert nfe == 250
    assert abs(x.mean().item() - MU) < 0.03 and abs(x.std().item() - STD) < 0.03


def test_sde_is_stochastic_and_ode_is_not():
    noise, y = _noise(64)
    den = Denoiser(GaussianVelocity())
    a, _ = euler_ode(den, noise, y, uniform_grid(10))
    b, _ = euler_ode(den, noise, y, uniform_grid(10))
    assert torch.equal(a, b)
    c, _ = euler_maruyama_sde(den, Transport(), noise, y, sde_grid(10))
    d, _ = euler_maruyama_sde(den, Transport(), noise, y, sde_grid(10))
    assert not torch.equal(c, d)


def test_sde_last_step_is_deterministic_mean_step():
    # With 2 steps the grid is [1, 0.04, 0]: one stochastic step, then the mean step with no noise.
    noise, y = _noise(8)
    calls = []

    def step_noise():
        calls.append(1)
        return torch.zeros_like(noise)

    euler_maruyama_sde(Denoiser(GaussianVelocity()), Transport(), noise, y, sde_grid(2), step_noise=step_noise)
    assert len(calls) == 1


def test_nfe_counts_and_cost_for_guidance_configurations():
    class Net(GaussianVelocity):
        exit_indices = (1,)
        num_classes = 2

        def forward(self, x, t, y, exits=(), hidden=()):
            out = super().forward(x, t, y)
            out.exits = {1: out.final * 0.5} if 1 in exits else {}
            return out

    noise, y = _noise(6)
    steps = 20
    cfg_interval = (0.0, 0.5)  # t <= 0.5 on 10 of the 20 Euler steps
    for ig, cfg, ag in [(InternalGuidance(), ClassifierFreeGuidance(), Autoguidance()),
                        (InternalGuidance(2.0), ClassifierFreeGuidance(), Autoguidance()),
                        (InternalGuidance(2.0), ClassifierFreeGuidance(1.5, cfg_interval), Autoguidance()),
                        (InternalGuidance(), ClassifierFreeGuidance(), Autoguidance(2.0, (0.2, 0.6)))]:
        den = Denoiser(Net(), [ig, cfg, ag.use_guide(Net())])
        _, nfe = euler_ode(den, noise, y, uniform_grid(steps))
        assert nfe == steps  # IG adds no evaluation
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1].tolist()  # the sampler's times
        in_cfg = sum(1 for t in grid if cfg.active(t))
        in_ag = sum(1 for t in grid if ag.active(t))
        assert den.network_passes == steps + in_ag
        assert den.network_rows == 6 * (steps + in_cfg + in_ag)
    assert in_cfg == 0 and in_ag == 9  # t = 0.6, 0.55, ..., 0.2: both ends inclusive


def test_run_sampler_rejects_unknown_names():
    noise, y = _noise(2)
    with pytest.raises(ConfigError, match="sampler"):
        run_sampler("dpm", Denoiser(GaussianVelocity()), Transport(), noise, y, 10)


def _public_sit_sde_reference(model, z, y, steps, exit_, ig_scale, ig_interval, cfg_scale, cfg_interval, noises):
    """The public SiT+IG Euler–Maruyama sampler as docs/method.md §6 and §8.1 describe it, written as a plain loop:
    one pass on [x; x] with [y; null] inside the CFG interval, IG per branch on the velocity, the score of
    the linear path s = ((t - 1) v - x) / t, the drift d = v - g/2 s with g = 2t, CFG on the drift, and a
    noise-free last step from 0.04 to 0."""
    t_steps = torch.linspace(1, 0.04, steps, dtype=torch.float64).tolist() + [0.0]
    x = z.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        use_cfg = cfg_scale > 1 and cfg_interval[0] <= t_cur <= cfg_interval[1]
        x_in = torch.cat([x, x]) if use_cfg else x
        y_in = torch.cat([y, torch.full_like(y, model.num_classes)]) if use_cfg else y
        out = model(x_in.float(), torch.full((x_in.shape[0],), t_cur), y_in, exits=[exit_])
        v_f, v_i = out.final.double(), out.exits[exit_].double()
        v = v_i + ig_scale * (v_f - v_i) if ig_scale > 1 and ig_interval[0] <= t_cur <= ig_interval[1] else v_f
        g = 2 * t_cur
        d = v - 0.5 * g * (((t_cur - 1) * v - x_in) / t_cur)
        if use_cfg:
            d_c, d_u = d.chunk(2)
            d = d_u + cfg_scale * (d_c - d_u)
        dt = t_next - t_cur
        x = x + d * dt
        if i < steps - 1:
            x = x + g**0.5 * noises[i] * abs(dt) ** 0.5
    return x


def test_sde_with_ig_and_cfg_matches_the_public_sampler_formulation():
    torch.manual_seed(0)
    model = build_backbone("SiT-T/2", input_size=8, in_channels=1, num_classes=10, exits=[2]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    z, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 5, 9])
    steps = 12
    noises = [torch.randn(4, 1, 8, 8, dtype=torch.float64) for _ in range(steps)]
    rules = [InternalGuidance(1.4, (0.0, 1.0)), ClassifierFreeGuidance(1.35, (0.0, 0.7))]
    with torch.no_grad():
        reference = _public_sit_sde_reference(model, z, y, steps, 2, 1.4, (0.0, 1.0), 1.35, (0.0, 0.7), noises)
        draws = iter(noises)
        ours, nfe = euler_maruyama_sde(Denoiser(model, rules), Transport("linear"), z, y, sde_grid(steps),
                                       model_dtype=torch.float32, step_noise=lambda: next(draws))
    assert nfe == steps
    assert (ours.double() - reference).abs().max().item() < 1e-5
    assert reference.abs().max() > 0.1  # a real trajectory, not zeros


def _public_sit_heun_reference(model, z, y, steps, cfg_scale, cfg_interval):
    """The public SiT Euler/Heun ODE sampler with CFG as a plain loop: linspace(1, 0, steps + 1), CFG decided once
    per step at t_cur (both evaluations of the step use that decision), the last step Euler."""
    t_steps = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    x = z.to(torch.float64)

    def velocity(x_, t, use_cfg):
        if not use_cfg:
            return model(x_.float(), torch.full((x_.shape[0],), t), y).final.double()
        out = model(torch.cat([x_, x_]).float(), torch.full((2 * x_.shape[0],), t),
                    torch.cat([y, torch.full_like(y, model.num_classes)])).final.double()
        v_c, v_u = out.chunk(2)
        return v_u + cfg_scale * (v_c - v_u)

    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        use_cfg = cfg_interval[0] <= t_cur <= cfg_interval[1]
        d_cur = velocity(x, t_cur, use_cfg)
        x_next = x + (t_next - t_cur) * d_cur
        if i < steps - 1:
            x_next = x + (t_next - t_cur) * 0.5 * (d_cur + velocity(x_next, t_next, use_cfg))
        x = x_next
    return x


def test_heun_decides_guidance_once_per_step_as_the_public_sit_sampler():
    torch.manual_seed(0)
    model = build_backbone("SiT-T/2", input_size=8, in_channels=1, num_classes=10, exits=[2]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    z, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        reference = _public_sit_heun_reference(model, z, y, 10, 1.8, (0.0, 0.55))
        ours, nfe = heun_ode(Denoiser(model, [ClassifierFreeGuidance(1.8, (0.0, 0.55))]), z, y, uniform_grid(10))
    assert nfe == 19
    assert (ours.double() - reference).abs().max().item() < 1e-5


def test_time_grids():
    assert uniform_grid(4) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    sde = sde_grid(5)
    assert sde[0] == 1.0 and sde[-2] == pytest.approx(0.04) and sde[-1] == 0.0 and len(sde) == 6
    shifted = shifted_grid(124, 0.3)
    assert len(shifted) == 125 and shifted[0] == 1.0 and shifted[-1] == 0.0
    assert all(a > b for a, b in zip(shifted[:-1], shifted[1:]))
    u = 0.5  # LightningDiT's own time, warped by s u / (1 + (s - 1) u), then t = 1 - u'
    assert shifted_grid(2, 0.3)[1] == pytest.approx(1 - 0.3 * u / (1 + (0.3 - 1) * u))
    assert shifted_grid(8, 1.0) == pytest.approx(uniform_grid(8))  # shift 1 is no shift
    # shift < 1 spends more of the grid near the noise (t close to 1) than a uniform grid
    assert sum(t > 0.5 for t in shifted) > sum(t > 0.5 for t in uniform_grid(124))
    with pytest.raises(ConfigError, match="schedule"):
        time_grid("karras", 10)


def test_a_full_heun_last_step_evaluates_at_zero():
    times = []

    class Recorder(GaussianVelocity):
        def forward(self, x, t, y, exits=(), hidden=()):
            times.append(float(t[0]))
            return super().forward(x, t.clamp(min=1e-3), y)

    noise, y = _noise(4)
    _, nfe = heun_ode(Denoiser(Recorder()), noise, y, uniform_grid(3), last_step="heun")
    assert nfe == 6 and times[-1] == 0.0
    times.clear()
    _, nfe = heun_ode(Denoiser(Recorder()), noise, y, uniform_grid(3))
    assert nfe == 5 and min(times) > 0


def test_run_sampler_builds_the_named_grid():
    noise, y = _noise(2)
    _, nfe = run_sampler("heun", Denoiser(GaussianVelocity()), Transport(), noise, y, 6, schedule="shifted",
                         heun_last_step="heun")
    assert nfe == 12
    with pytest.raises(ConfigError, match="steps"):
        run_sampler("sde", Denoiser(GaussianVelocity()), Transport(), noise, y, 1)
