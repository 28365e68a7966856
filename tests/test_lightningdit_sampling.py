"""LightningDiT's published sampler against a plain transcription of the official one (LightningDiT/inference.py,
transport/integrators.py, models/lightningdit.py forward_with_cfg/forward_with_ig, the yaml's sample section):
the shifted grid, torchdiffeq's fixed-grid heun2, CFG on LightningDiT's t >= 0.19 decided at every model call,
IG at every call; and the presets' fit to the model."""
import pytest
import torch

from igdit.config import ConfigError
from igdit.guidance import Denoiser, build_rules
from igdit.models import LightningDiT
from igdit.presets import PRESETS, get_preset
from igdit.samplers import run_sampler, shifted_grid
from igdit.transport import Transport

TINY = dict(input_size=4, in_channels=4, num_classes=5, depth=3, hidden_size=32, num_heads=2)


def official_grid(num_steps=125, shift=0.3):
    """transport/integrators.py ode.__init__: float32 linspace(0, 1, N) warped by s t / (1 + (s - 1) t)."""
    t = torch.linspace(0, 1, num_steps)
    return torch.tensor([shift * tn / (1 + (shift - 1) * tn) for tn in t])


def official_sample(network, z, y, cfg_scale, ig_scale, cfg_interval_start=0.19, num_steps=125, shift=0.3):
    """inference.py + torchdiffeq heun2 on the official fixed grid, in LightningDiT's time (0 = noise), float32.

    network(x, s, y) -> (final, zsr), both data - noise, as LightningDiT.forward.
    """
    using_cfg = cfg_scale > 1.0
    if using_cfg:
        z = torch.cat([z, z])
        y = torch.cat([y, torch.full_like(y, TINY["num_classes"])])

    def model_fn(x, t):
        if not using_cfg:  # forward_with_ig(ig_interval=1): IG whenever t <= 1, i.e. always
            out, zsr = network(x, t, y)
            return out + (ig_scale - 1) * (out - zsr)
        half = x[: len(x) // 2]
        out, zsr = network(torch.cat([half, half]), t, y)
        out = out + (ig_scale - 1) * (out - zsr)  # forward_with_cfg: IG in both halves first
        cond, uncond = torch.split(out, len(out) // 2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        if t[0] < cfg_interval_start:  # cfg_interval=True: the conditional half below the start
            guided = cond
        return torch.cat([guided, guided])

    ts = official_grid(num_steps, shift)
    x = z
    for t0, t1 in zip(ts[:-1], ts[1:]):  # torchdiffeq heun2: k1 at t0, k2 at t1 from the Euler predictor
        dt = t1 - t0
        k1 = model_fn(x, torch.full((x.shape[0],), float(t0)))
        k2 = model_fn(x + dt * k1, torch.full((x.shape[0],), float(t1)))
        x = x + dt * 0.5 * (k1 + k2)
    return x[: len(x) // 2] if using_cfg else x


def _model():
    torch.manual_seed(0)
    model = LightningDiT("T/1", **TINY, exits=[2]).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _official_network(model):
    """The network in LightningDiT's own time: the backbone's forward undoes its own conversion."""
    def network(x, s, y):
        out = model(x, 1 - s, y, exits=[2])
        return -out.final, -out.exits[2]
    return network


def test_shifted_grid_is_the_official_grid():
    ours = torch.tensor(shifted_grid(124, 0.3), dtype=torch.float64)
    theirs = 1 - official_grid().double()  # the official grid is float32
    assert len(ours) == 125 and ours[0] == 1.0 and ours[-1] == 0.0
    assert (ours - theirs).abs().max().item() < 1.5e-7  # ~one float32 ulp at 1 (1.19e-7): the official grid is float32
    assert torch.all(ours[1:] < ours[:-1])
    # CFG switches on where LightningDiT's t >= 0.19: grid point 55 of 125 (project t <= 0.81)
    first_cfg = next(i for i, t in enumerate(official_grid()) if t >= 0.19)
    assert first_cfg == 55 and ours[first_cfg] <= 0.81 < ours[first_cfg - 1]


@pytest.mark.parametrize("name,cfg_scale,ig_scale", [("lightningdit-xl1-ig-cfg", 1.45, 1.4),
                                                      ("lightningdit-xl1-ig", 1.0, 1.7)])
def test_preset_samples_like_the_official_sampler(name, cfg_scale, ig_scale):
    model = _model()
    preset = PRESETS[name]
    g = torch.Generator().manual_seed(2)
    z, y = torch.randn(3, 4, 4, 4, generator=g), torch.tensor([0, 2, 4])
    with torch.no_grad():
        theirs = official_sample(_official_network(model), z, y, cfg_scale, ig_scale)
        denoiser = Denoiser(model, build_rules(preset.guidance, "preset"))
        s = preset.sampling
        ours, nfe = run_sampler(s.sampler, denoiser, Transport(), z, y, s.steps, schedule=s.schedule, shift=s.shift,
                                heun_last_step=s.heun_last_step, decide=s.heun_decide)
    assert nfe == 248  # 124 full Heun steps, as heun2 on 125 grid points
    # float32 state and time in the official loop, float64 state here
    assert (ours - theirs).abs().max().item() < 2e-5
    assert theirs.abs().max() > 0.5  # a real trajectory
    if cfg_scale > 1:  # deciding CFG once per step (SiT's way) misses the boundary step's second evaluation
        with torch.no_grad():
            per_step, _ = run_sampler(s.sampler, Denoiser(model, build_rules(preset.guidance, "preset")), Transport(),
                                      z, y, s.steps, schedule=s.schedule, shift=s.shift, heun_last_step="heun",
                                      decide="step")
        assert (per_step - theirs).abs().max().item() > 50 * (ours - theirs).abs().max().item()


def test_a_preset_refuses_a_model_it_does_not_fit():
    tiny = _model()
    with pytest.raises(ConfigError, match=r"^--preset: 'lightningdit-xl1-ig-cfg' .*LightningDiT-XL/1.*"
                                          r"LightningDiT-T/1"):
        get_preset("lightningdit-xl1-ig-cfg", tiny)


def test_igdit_sample_takes_the_presets_sampler_including_per_evaluation_decisions():
    from igdit.commands.sample import parse

    args = parse(["--ckpt", "x", "--preset", "lightningdit-xl1-ig"])
    assert (args.sampler, args.steps, args.schedule, args.shift, args.heun_last_step, args.heun_decide) == \
        ("heun", 124, "shifted", 0.3, "heun", "evaluation")
    assert args.ig.scale == 1.7 and args.cfg.scale == 1.0
    assert parse(["--ckpt", "x", "--preset", "sit-xl2-ig-cfg"]).heun_decide == "step"
