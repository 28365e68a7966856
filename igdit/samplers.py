"""Samplers: plain functions of (denoiser, noise, labels, steps). They know nothing about guidance.

Time runs from t = 1 (noise) to t = 0 (data). The state is kept in float64 (as the public SiT code does);
the denoiser is called in the model's dtype.
"""
from __future__ import annotations

import torch


def euler_ode(denoiser, noise: torch.Tensor, labels: torch.Tensor, steps: int = 50,
              model_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, int]:
    """Euler integration of dx/dt = v(x, t) on linspace(1, 0, steps + 1).

    noise: (N, C, H, W) at t = 1; labels: (N,). Returns (x at t = 0 as noise.dtype, number of forward passes).
    """
    if steps < 1:
        raise ValueError(f"steps: {steps} is not allowed; expected an integer >= 1")
    dtype = model_dtype or noise.dtype
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    x = noise.to(torch.float64)
    nfe = 0
    for t_cur, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        v = denoiser(x.to(dtype), t_cur, labels).to(torch.float64)
        nfe += 1
        x = x + (t_next - t_cur) * v
    return x.to(noise.dtype), nfe
