"""Time grids and samplers. Samplers are plain functions of (denoiser, noise, labels, grid), as k-diffusion's
take sigmas: they know nothing about the network or the guidance, only the grid they walk.

Time runs from t = 1 (noise) to t = 0 (data). A grid is a descending list of times from 1 to 0; named schedules
build them (``SCHEDULES``): ``uniform`` (linspace(1, 0, steps + 1)), ``sde`` (the SiT/REPA evaluation grid,
linspace(1, 0.04, steps) then 0) and ``shifted`` (the LightningDiT time shift). The samplers are registered in
``SAMPLERS``. Both registries are read wherever a schedule or a sampler is offered (``Sampling``, the FIDCallback,
`igdit sample`, the study), and both also take the import path of a function of one's own
(``schedule: mypackage.grids.cosine``), so a new grid or sampler is one file and no edit here. The state is kept in float64,
as the public SiT code does; the denoiser is called in the model's dtype. Each sampler returns (x at t = 0,
NFE), NFE being the number of denoiser evaluations (a doubled CFG batch counts once, as the papers count it).

A denoiser is called as ``denoiser(x, t, labels, decide_at=...)``: ``decide_at`` is the time at which guidance
rules decide whether they act. Heun evaluates twice per step; by default the rules decide once per step, at its
start, as the public SiT Euler/Heun sampler does (``decide="step"``); LightningDiT's heun2 (torchdiffeq) calls
its guided model at each evaluation's own time, so a CFG interval boundary inside a step switches CFG on for the
second evaluation only (``decide="evaluation"``).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

import torch

from igdit.config import ConfigError, check_choice, check_number


# ---- time grids ---------------------------------------------------------------------------------------
def uniform_grid(steps: int) -> list[float]:
    """linspace(1, 0, steps + 1): ``steps`` equal steps from noise to data."""
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()


def sde_grid(steps: int, t_last: float = 0.04) -> list[float]:
    """The SiT/REPA Euler–Maruyama grid: linspace(1, t_last, steps) then 0 (``steps`` steps, the last one from
    t_last to 0 taken without noise)."""
    return torch.linspace(1.0, t_last, steps, dtype=torch.float64).tolist() + [0.0]


def shifted_grid(steps: int, shift: float = 0.3) -> list[float]:
    """The LightningDiT time shift on ``steps`` steps: u = linspace(0, 1, steps + 1) in LightningDiT's own time
    (0 = noise) is warped to u' = s u / (1 + (s - 1) u) and turned into the project's time t = 1 - u'.
    s < 1 spends more steps near the noise. (LightningDiT's 125 grid points are 124 steps.)"""
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    grid = (1 - shift * u / (1 + (shift - 1) * u)).tolist()
    grid[0], grid[-1] = 1.0, 0.0  # exactly: the warp of 1 is 1 only up to rounding
    return grid


# name -> grid function (steps[, shift]) -> descending times from 1 to 0
SCHEDULES: dict[str, Callable[..., list[float]]] = {"uniform": uniform_grid, "sde": sde_grid, "shifted": shifted_grid}


def _registered(registry: dict, name: str, field: str, kind: str):
    """``registry[name]``, or the object at the import path ``name``; one-line ConfigError otherwise."""
    if name in registry:
        return registry[name]
    if isinstance(name, str) and "." in name:
        from jsonargparse.typing import import_object

        try:
            return import_object(name)
        except Exception:
            pass
    raise ConfigError(field, name, f"choose a {kind}: " + ", ".join(registry) + f" or the import path of a {kind} "
                                   "function of your own")


def schedule_function(schedule: str, field: str = "schedule") -> Callable[..., list[float]]:
    """The grid function of a registered schedule name or an import path (called with ``steps``, and ``shift``
    when it takes one)."""
    fn = _registered(SCHEDULES, schedule, field, "time grid")
    if not callable(fn):
        raise ConfigError(field, schedule, "names no function (a time grid maps steps to descending times)")
    return fn


def time_grid(schedule: str, steps: int, shift: float = 0.3) -> list[float]:
    """The schedule's grid with ``steps`` steps (``shift`` passed to grids that take one, e.g. ``shifted``)."""
    fn = schedule_function(schedule)
    check_number("steps", steps, low=1, integer=True)
    if "shift" in inspect.signature(fn).parameters:
        check_number("shift", shift, low=0, low_inclusive=False)
        return _check_grid(fn(steps, shift=shift))
    return _check_grid(fn(steps))


# ---- samplers -----------------------------------------------------------------------------------------
def _check_grid(grid: Sequence[float]) -> list[float]:
    grid = [float(t) for t in grid]
    if len(grid) < 2 or grid[0] != 1.0 or grid[-1] != 0.0 or any(a <= b for a, b in zip(grid[:-1], grid[1:])):
        raise ValueError(f"a time grid descends strictly from 1 to 0, got {grid[:3]} ... {grid[-2:]}")
    return grid


def euler_ode(denoiser, noise: torch.Tensor, labels: torch.Tensor, grid: Sequence[float],
              model_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, int]:
    """Euler integration of dx/dt = v(x, t) along ``grid``. NFE = len(grid) - 1.

    noise: (N, C, H, W) at t = 1; labels: (N,). Returns (x at t = 0 in noise.dtype, NFE).
    """
    grid = _check_grid(grid)
    dtype = model_dtype or noise.dtype
    x = noise.to(torch.float64)
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t_cur) * denoiser(x.to(dtype), t_cur, labels, decide_at=t_cur).to(torch.float64)
    return x.to(noise.dtype), len(grid) - 1


def heun_ode(denoiser, noise: torch.Tensor, labels: torch.Tensor, grid: Sequence[float],
             model_dtype: Optional[torch.dtype] = None, last_step: Literal["euler", "heun"] = "euler",
             decide: Literal["step", "evaluation"] = "step") -> tuple[torch.Tensor, int]:
    """Heun (2nd order) along ``grid``. The last step is Euler (SiT's ODE sampler; NFE = 2 steps - 1) or a full
    Heun step ending in an evaluation at t = 0 (LightningDiT's fixed-grid heun2; NFE = 2 steps). Guidance decides
    once per step at the step's start (``decide="step"``, SiT) or at each evaluation's own time
    (``"evaluation"``, LightningDiT). Shapes as ``euler_ode``.
    """
    grid = _check_grid(grid)
    dtype = model_dtype or noise.dtype
    steps = len(grid) - 1
    x = noise.to(torch.float64)
    nfe = 0
    for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        dt = t_next - t_cur
        d_cur = denoiser(x.to(dtype), t_cur, labels, decide_at=t_cur).to(torch.float64)
        nfe += 1
        x_next = x + dt * d_cur
        if i < steps - 1 or last_step == "heun":
            d_next = denoiser(x_next.to(dtype), t_next, labels,
                              decide_at=t_next if decide == "evaluation" else t_cur).to(torch.float64)
            nfe += 1
            x_next = x + dt * 0.5 * (d_cur + d_next)
        x = x_next
    return x.to(noise.dtype), nfe


def euler_maruyama_sde(denoiser, transport, noise: torch.Tensor, labels: torch.Tensor, grid: Sequence[float],
                       model_dtype: Optional[torch.dtype] = None,
                       step_noise: Optional[Callable[[], torch.Tensor]] = None) -> tuple[torch.Tensor, int]:
    """Euler–Maruyama on the reverse SDE with diffusion g(t) = 2t, as the paper's evaluation (SiT/REPA).

    Along ``grid`` (the ``sde`` schedule: linspace(1, 0.04, steps) then 0): every step but the last is
        x <- x + d dt + sqrt(g(t)) sqrt(|dt|) eps,   d = v - g(t)/2 * score(v, x, t),   dt < 0,
    and the last step (to t = 0) is its mean only, without noise. The score comes from the (guided) velocity
    through ``transport``. NFE = len(grid) - 1. step_noise() returns the (N, C, H, W) Gaussian noise of one step
    (default torch.randn); pass per-sample generators to make samples independent of batching.
    """
    grid = _check_grid(grid)
    dtype = model_dtype or noise.dtype
    steps = len(grid) - 1
    x = noise.to(torch.float64)
    step_noise = step_noise or (lambda: torch.randn_like(noise))
    for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        dt = t_next - t_cur
        t_vec = torch.full((x.shape[0],), t_cur, dtype=torch.float64, device=x.device)
        v = denoiser(x.to(dtype), t_cur, labels, decide_at=t_cur).to(torch.float64)
        g = 2.0 * t_cur
        drift = v - 0.5 * g * transport.velocity_to_score(v, x, t_vec)
        x = x + drift * dt
        if i < steps - 1:
            x = x + (g * abs(dt)) ** 0.5 * step_noise().to(torch.float64)
    return x.to(noise.dtype), steps


# ---- the sampler registry -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplerEntry:
    """A sampler as the registry offers it: ``run(denoiser, transport, noise, labels, grid, model_dtype, step_noise,
    heun_last_step, decide) -> (x at t = 0, NFE)``, the schedule it walks by default, and the fewest steps it takes."""

    run: Callable[..., tuple[torch.Tensor, int]]
    default_schedule: str = "uniform"
    min_steps: int = 1


def _euler(denoiser, transport, noise, labels, grid, model_dtype, step_noise, heun_last_step, decide):
    return euler_ode(denoiser, noise, labels, grid, model_dtype)


def _heun(denoiser, transport, noise, labels, grid, model_dtype, step_noise, heun_last_step, decide):
    check_choice("decide", decide, ("step", "evaluation"))
    return heun_ode(denoiser, noise, labels, grid, model_dtype, heun_last_step, decide)


def _sde(denoiser, transport, noise, labels, grid, model_dtype, step_noise, heun_last_step, decide):
    return euler_maruyama_sde(denoiser, transport, noise, labels, grid, model_dtype, step_noise)


SAMPLERS: dict[str, SamplerEntry] = {"euler": SamplerEntry(_euler), "heun": SamplerEntry(_heun),
                                     "sde": SamplerEntry(_sde, default_schedule="sde", min_steps=2)}


def sampler_entry(name: str, field: str = "sampler") -> SamplerEntry:
    """The registered sampler ``name``, or the ``SamplerEntry`` at an import path."""
    entry = _registered(SAMPLERS, name, field, "sampler")
    if not isinstance(entry, SamplerEntry):
        raise ConfigError(field, name, "names no SamplerEntry (igdit.samplers.SamplerEntry: run, default_schedule, "
                                       "min_steps)")
    return entry


def check_sampling(sampler: str, steps: int, schedule: Optional[str] = None, prefix: str = "") -> None:
    """The sampler and the schedule exist and the sampler takes ``steps``; one-line ConfigErrors naming
    ``<prefix>sampler`` / ``<prefix>steps`` / ``<prefix>schedule``."""
    entry = sampler_entry(sampler, f"{prefix}sampler")
    if steps < entry.min_steps:
        raise ConfigError(f"{prefix}steps", steps, f"the {sampler} sampler needs at least {entry.min_steps} steps")
    schedule_function(schedule or entry.default_schedule, f"{prefix}schedule")


def run_sampler(name: str, denoiser, transport, noise: torch.Tensor, labels: torch.Tensor, steps: int,
                model_dtype: Optional[torch.dtype] = None,
                step_noise: Optional[Callable[[], torch.Tensor]] = None, schedule: Optional[str] = None,
                shift: float = 0.3, heun_last_step: Literal["euler", "heun"] = "euler",
                decide: Literal["step", "evaluation"] = "step") -> tuple[torch.Tensor, int]:
    """Sample with the sampler ``name`` (``SAMPLERS``: "euler", "heun", "sde", or an import path) on ``steps`` steps
    of ``schedule`` (default: the sampler's, uniform for the ODE samplers, the sde grid for "sde");
    ``heun_last_step`` and ``decide``: see ``heun_ode``."""
    entry = sampler_entry(name)
    check_number("steps", steps, low=entry.min_steps, integer=True)
    grid = time_grid(schedule or entry.default_schedule, steps, shift)
    return entry.run(denoiser, transport, noise, labels, grid, model_dtype, step_noise, heun_last_step, decide)
