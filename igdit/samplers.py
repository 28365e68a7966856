"""Samplers: plain functions of (denoiser, noise, labels, steps). They know nothing about guidance.

Time runs from t = 1 (noise) to t = 0 (data). The state is kept in float64, as the public SiT code
does; the denoiser is called in the model's dtype. Each sampler returns (x at t = 0, NFE), NFE being
the number of denoiser evaluations (a doubled CFG batch counts once, as the papers count it).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

SAMPLERS = ("euler", "heun", "sde")


def _check_steps(steps: int, minimum: int = 1) -> None:
    if not isinstance(steps, int) or steps < minimum:
        from igdit.config import ConfigError

        raise ConfigError("steps", steps, f"expected an integer >= {minimum}")


def euler_ode(denoiser, noise: torch.Tensor, labels: torch.Tensor, steps: int = 50,
              model_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, int]:
    """Euler integration of dx/dt = v(x, t) on linspace(1, 0, steps + 1). NFE = steps.

    noise: (N, C, H, W) at t = 1; labels: (N,). Returns (x at t = 0 in noise.dtype, NFE).
    """
    _check_steps(steps)
    dtype = model_dtype or noise.dtype
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    x = noise.to(torch.float64)
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t_cur) * denoiser(x.to(dtype), t_cur, labels).to(torch.float64)
    return x.to(noise.dtype), steps


def heun_ode(denoiser, noise: torch.Tensor, labels: torch.Tensor, steps: int = 50,
             model_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, int]:
    """Heun (2nd order) on linspace(1, 0, steps + 1); the last step is Euler, as SiT's ODE sampler.

    NFE = 2 * steps - 1. Shapes as `euler_ode`.
    """
    _check_steps(steps)
    dtype = model_dtype or noise.dtype
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    x = noise.to(torch.float64)
    nfe = 0
    for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        dt = t_next - t_cur
        d_cur = denoiser(x.to(dtype), t_cur, labels).to(torch.float64)
        nfe += 1
        x_next = x + dt * d_cur
        if i < steps - 1:
            d_next = denoiser(x_next.to(dtype), t_next, labels).to(torch.float64)
            nfe += 1
            x_next = x + dt * 0.5 * (d_cur + d_next)
        x = x_next
    return x.to(noise.dtype), nfe


def euler_maruyama_sde(denoiser, transport, noise: torch.Tensor, labels: torch.Tensor, steps: int = 250,
                       t_last: float = 0.04, model_dtype: Optional[torch.dtype] = None,
                       step_noise: Optional[Callable[[], torch.Tensor]] = None) -> tuple[torch.Tensor, int]:
    """Euler–Maruyama on the reverse SDE with diffusion g(t) = 2t, as the paper's evaluation (SiT/REPA).

    Grid linspace(1, t_last, steps) then 0: steps - 1 stochastic steps
        x <- x + d dt + sqrt(g(t)) sqrt(|dt|) eps,   d = v - g(t)/2 * score(v, x, t),   dt < 0,
    and a last deterministic mean step from t_last to 0 (no noise). The score comes from the (guided)
    velocity through `transport`. NFE = steps. step_noise() returns the (N, C, H, W) Gaussian noise of
    one step (default torch.randn); pass per-sample generators to make samples independent of batching.
    """
    _check_steps(steps, 2)
    dtype = model_dtype or noise.dtype
    grid = torch.linspace(1.0, t_last, steps, dtype=torch.float64).tolist() + [0.0]
    x = noise.to(torch.float64)
    step_noise = step_noise or (lambda: torch.randn_like(noise))
    for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        dt = t_next - t_cur
        t_vec = torch.full((x.shape[0],), t_cur, dtype=torch.float64, device=x.device)
        v = denoiser(x.to(dtype), t_cur, labels).to(torch.float64)
        g = 2.0 * t_cur
        drift = v - 0.5 * g * transport.velocity_to_score(v, x, t_vec)
        x = x + drift * dt
        if i < steps - 1:
            x = x + (g * abs(dt)) ** 0.5 * step_noise().to(torch.float64)
    return x.to(noise.dtype), steps


def run_sampler(name: str, denoiser, transport, noise: torch.Tensor, labels: torch.Tensor, steps: int,
                model_dtype: Optional[torch.dtype] = None,
                step_noise: Optional[Callable[[], torch.Tensor]] = None) -> tuple[torch.Tensor, int]:
    """Dispatch by name ("euler", "heun", "sde")."""
    if name == "euler":
        return euler_ode(denoiser, noise, labels, steps, model_dtype)
    if name == "heun":
        return heun_ode(denoiser, noise, labels, steps, model_dtype)
    if name == "sde":
        return euler_maruyama_sde(denoiser, transport, noise, labels, steps, model_dtype=model_dtype,
                                  step_noise=step_noise)
    from igdit.config import ConfigError

    raise ConfigError("sampler", name, "choose one of " + ", ".join(SAMPLERS))
