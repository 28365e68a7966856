"""Paths between data and noise, in the project's one time convention.

t in [0, 1] and **t = 1 is pure noise**: x_t = alpha(t) * x + sigma(t) * eps, and the network predicts
the velocity v = dx_t/dt = alpha'(t) * x + sigma'(t) * eps. Everything that samples, guides or scores
uses these conversions; backbones or checkpoints with another convention are converted at the boundary.
"""
from __future__ import annotations

import math

import torch



def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) times -> (N, 1, 1, ...) so they broadcast against (N, C, H, W) tensors."""
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class LinearPath:
    """x_t = (1 - t) x + t eps; v = eps - x (SiT, REPA, IG)."""

    name = "linear"

    def alpha(self, t): return 1 - t
    def sigma(self, t): return t
    def d_alpha(self, t): return -torch.ones_like(t)
    def d_sigma(self, t): return torch.ones_like(t)


class CosinePath:
    """x_t = cos(pi t / 2) x + sin(pi t / 2) eps (variance preserving)."""

    name = "cosine"

    def alpha(self, t): return torch.cos(0.5 * math.pi * t)
    def sigma(self, t): return torch.sin(0.5 * math.pi * t)
    def d_alpha(self, t): return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)
    def d_sigma(self, t): return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)


PATHS = {"linear": LinearPath, "cosine": CosinePath}
TIME_SAMPLINGS = ("uniform", "lognormal")


class Transport:
    """A path plus the training-time distribution of t.

    path: "linear" | "cosine".
    time_sampling: "uniform" (t ~ U(0, 1), the IG/SiT default) or "lognormal" (t = sigmoid(m + s n),
        n ~ N(0, 1): the logit-normal of SD3, which REPA's code calls lognormal).
    """

    def __init__(self, path: str = "linear", time_sampling: str = "uniform",
                 lognormal_mean: float = 0.0, lognormal_std: float = 1.0):
        # the values arrive checked: model.transport is a TransportConfig, typed where the CLI parses it
        self.path = PATHS[path]()
        self.time_sampling, self.lognormal_mean, self.lognormal_std = time_sampling, lognormal_mean, lognormal_std

    def sample_t(self, n: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training times, shape (n,), in [0, 1] (t = 1 is noise)."""
        if self.time_sampling == "uniform":
            return torch.rand(n, device=device, generator=generator)
        normal = torch.randn(n, device=device, generator=generator)
        return torch.sigmoid(self.lognormal_mean + self.lognormal_std * normal)

    def interpolate(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """x, noise: (N, C, H, W); t: (N,). Returns (x_t, v_target), both (N, C, H, W)."""
        tt = _bcast(t, x)
        p = self.path
        x_t = p.alpha(tt) * x + p.sigma(tt) * noise
        v = p.d_alpha(tt) * x + p.d_sigma(tt) * noise
        return x_t, v

    def _solve(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Invert [x_t; v] = [[a, s], [a', s']] [x; eps] for (x, eps); the determinant never vanishes."""
        tt = _bcast(t, x_t)
        p = self.path
        a, s, da, ds = p.alpha(tt), p.sigma(tt), p.d_alpha(tt), p.d_sigma(tt)
        det = a * ds - s * da
        return (ds * x_t - s * v) / det, (a * v - da * x_t) / det

    def velocity_to_data(self, v, x_t, t):
        """Predicted clean sample x0_hat (N, C, H, W) from a velocity at (x_t, t)."""
        return self._solve(v, x_t, t)[0]

    def velocity_to_noise(self, v, x_t, t):
        """Predicted noise eps_hat (N, C, H, W) from a velocity at (x_t, t)."""
        return self._solve(v, x_t, t)[1]

    def velocity_to_score(self, v, x_t, t):
        """Score grad log p_t(x_t) = -eps_hat / sigma(t); undefined at t = 0 (sigma = 0)."""
        return -self.velocity_to_noise(v, x_t, t) / self.path.sigma(_bcast(t, x_t))

    def data_noise_to_velocity(self, x, noise, t):
        """Velocity (N, C, H, W) implied by a clean sample and a noise at time t."""
        tt = _bcast(t, x)
        return self.path.d_alpha(tt) * x + self.path.d_sigma(tt) * noise
