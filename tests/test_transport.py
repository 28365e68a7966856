"""The path identities every sampler and loss relies on (t = 1 is noise)."""
import math

import pytest
from jsonargparse import ArgumentError
import torch

from igdit.config import ConfigError, one_line
from igdit.transport import Transport


@pytest.fixture(params=["linear", "cosine"])
def transport(request):
    return Transport(path=request.param)


def _data(n=6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64)


def test_x_t_is_data_at_t0_and_noise_at_t1(transport):
    x, eps = _data()
    x0, _ = transport.interpolate(x, eps, torch.zeros(6, dtype=torch.float64))
    x1, _ = transport.interpolate(x, eps, torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(x0, x)
    torch.testing.assert_close(x1, eps, atol=1e-12, rtol=0)


def test_linear_velocity_target_is_noise_minus_data():
    x, eps = _data()
    _, v = Transport("linear").interpolate(x, eps, torch.rand(6, dtype=torch.float64))
    torch.testing.assert_close(v, eps - x)


def test_velocity_target_is_time_derivative_of_path(transport):
    x, eps = _data()
    t = torch.full((6,), 0.37, dtype=torch.float64)
    h = 1e-6
    plus, _ = transport.interpolate(x, eps, t + h)
    minus, _ = transport.interpolate(x, eps, t - h)
    _, v = transport.interpolate(x, eps, t)
    torch.testing.assert_close(v, (plus - minus) / (2 * h), atol=1e-6, rtol=0)


def test_velocity_target_recovers_data_and_noise(transport):
    x, eps = _data()
    t = torch.linspace(0.05, 0.95, 6, dtype=torch.float64)
    x_t, v = transport.interpolate(x, eps, t)
    torch.testing.assert_close(transport.velocity_to_data(v, x_t, t), x)
    torch.testing.assert_close(transport.velocity_to_noise(v, x_t, t), eps)
    torch.testing.assert_close(transport.data_noise_to_velocity(x, eps, t), v)


def test_linear_score_matches_public_sit_formula():
    # SiT's sampler: s = ((t - 1) v - x_t) / t for the linear path.
    x, eps = _data()
    t = torch.full((6,), 0.6, dtype=torch.float64)
    x_t, v = Transport("linear").interpolate(x, eps, t)
    score = Transport("linear").velocity_to_score(v, x_t, t)
    torch.testing.assert_close(score, ((0.6 - 1) * v - x_t) / 0.6)
    torch.testing.assert_close(score, -eps / 0.6)


def test_time_sampling_ranges_and_lognormal_centre():
    g = torch.Generator().manual_seed(0)
    uniform = Transport(time_sampling="uniform").sample_t(20000, generator=g)
    assert uniform.min() >= 0 and uniform.max() <= 1 and abs(uniform.mean().item() - 0.5) < 0.01
    lognormal = Transport(time_sampling="lognormal", lognormal_mean=0.0, lognormal_std=1.0).sample_t(20000, generator=g)
    assert lognormal.min() > 0 and lognormal.max() < 1
    assert abs(lognormal.median().item() - 0.5) < 0.02  # sigmoid(0) = 0.5
    assert lognormal.std() < uniform.std()  # concentrated in the middle
    shifted = Transport(time_sampling="lognormal", lognormal_mean=1.0).sample_t(20000, generator=g)
    assert abs(shifted.median().item() - 1 / (1 + math.exp(-1))) < 0.02


@pytest.mark.parametrize("kwargs,field", [({"path": "ddpm"}, "model.transport.path"),
                                          ({"time_sampling": "beta"}, "model.transport.time_sampling"),
                                          ({"lognormal_std": 0.0}, "model.transport.lognormal_std")])
def test_bad_transport_values_name_the_field(kwargs, field):
    """Checked once, where the config types them (TransportConfig), as the CLI parses a model."""
    from helpers import tiny_module

    with pytest.raises((ConfigError, ArgumentError)) as err:
        tiny_module(transport=kwargs)
    assert one_line(err.value).startswith(field) and "\n" not in one_line(err.value)
