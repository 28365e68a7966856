"""The IG rule, CFG, their order and their intervals, on a stand-in backbone with known outputs."""
import pytest
import torch

from igdit.config import ConfigError
from igdit.guidance import Denoiser, GuidanceRule, classifier_free_guidance, internal_guidance
from igdit.models.output import DiTOutput
from igdit.samplers import euler_ode


class AffineBackbone(torch.nn.Module):
    """final = a_y * x, exit(2) = b_y * x for label y (null label 2): every output is known in closed form."""

    num_classes, in_channels, input_size = 2, 1, 1
    exit_indices = (2,)

    def __init__(self):
        super().__init__()
        self.a = torch.tensor([1.0, 2.0, 0.5])  # per label (0, 1, null)
        self.b = torch.tensor([0.8, 1.0, 0.25])
        self.calls = []

    def forward(self, x, t, y, exits=(), hidden=()):
        self.calls.append((x.shape[0], tuple(exits)))
        view = (-1, 1, 1, 1)
        out = DiTOutput(final=self.a[y].view(view) * x)
        if 2 in exits:
            out.exits[2] = self.b[y].view(view) * x
        return out


def test_ig_scale_one_is_final_output():
    v_final, v_exit = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    assert torch.equal(internal_guidance(v_final, v_exit, 1.0), v_final)
    torch.testing.assert_close(internal_guidance(v_final, v_exit, 2.5), v_exit + 2.5 * (v_final - v_exit))


def test_cfg_scale_one_is_conditional_output():
    v_c, v_u = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.equal(classifier_free_guidance(v_c, v_u, 1.0), v_c)
    # all channels are guided (the DiT/SiT first-3-channels bug is not reproduced)
    torch.testing.assert_close(classifier_free_guidance(v_c, v_u, 3.0), v_u + 3 * (v_c - v_u))


def test_ig_inside_each_branch_then_cfg_hand_computed():
    backbone = AffineBackbone()
    x = torch.ones(1, 1, 1, 1)
    y = torch.tensor([1])
    w, s = 1.5, 3.0
    den = Denoiser(backbone, ig=GuidanceRule(w, (0, 1)), cfg=GuidanceRule(s, (0, 1)))
    v = den(x, 0.5, y)
    cond = 1.0 + w * (2.0 - 1.0)      # exit 1.0, final 2.0 for label 1
    uncond = 0.25 + w * (0.5 - 0.25)  # exit 0.25, final 0.5 for the null label
    assert v.item() == pytest.approx(uncond + s * (cond - uncond))
    assert backbone.calls == [(2, (2,))]  # one pass on the doubled batch, exit head requested once


def test_intervals_are_inclusive_and_cost_nothing_outside():
    backbone = AffineBackbone()
    den = Denoiser(backbone, ig=GuidanceRule(2.0, (0.3, 0.7)), cfg=GuidanceRule(2.0, (0.5, 1.0)))
    x, y = torch.ones(4, 1, 1, 1), torch.zeros(4, dtype=torch.long)
    for t in (0.0, 0.3, 0.5, 0.7, 0.71, 1.0):
        den(x, t, y)
    batch_sizes = [c[0] for c in backbone.calls]
    exits = [c[1] for c in backbone.calls]
    assert batch_sizes == [4, 4, 8, 8, 8, 8]       # CFG doubles only for t in [0.5, 1]
    assert exits == [(), (2,), (2,), (2,), (), ()]  # exit head only for t in [0.3, 0.7]


def test_euler_counts_one_forward_pass_per_step_with_or_without_ig():
    noise, y = torch.randn(3, 1, 2, 2), torch.zeros(3, dtype=torch.long)
    for ig in (GuidanceRule(), GuidanceRule(2.0)):
        _, nfe = euler_ode(Denoiser(AffineBackbone(), ig=ig), noise, y, steps=17)
        assert nfe == 17


def test_euler_solves_linear_ode_to_first_order():
    # v = a x with a = 1 for label 0: x(0) = x(1) * exp(-1); Euler with N steps has O(1/N) error.
    noise, y = torch.ones(1, 1, 1, 1), torch.zeros(1, dtype=torch.long)
    errs = [abs(euler_ode(Denoiser(AffineBackbone()), noise, y, steps=n)[0].item() - torch.e ** -1) for n in (50, 100)]
    assert errs[1] < errs[0] * 0.6 and errs[1] < 5e-3


def test_bad_guidance_values():
    with pytest.raises(ConfigError, match=r"guidance.ig.interval"):
        Denoiser(AffineBackbone(), ig=GuidanceRule(2.0, (0.8, 0.2)))
    with pytest.raises(ConfigError, match=r"guidance.cfg.scale"):
        Denoiser(AffineBackbone(), cfg=GuidanceRule(float("nan")))
    no_exit = AffineBackbone()
    no_exit.exit_indices = ()
    with pytest.raises(ValueError, match=r"exits \[\]"):
        Denoiser(no_exit, ig=GuidanceRule(2.0))


def test_autoguidance_inside_each_branch_before_cfg():
    main, guide = AffineBackbone(), AffineBackbone()
    guide.a = torch.tensor([0.5, 1.5, 0.4])
    x, y = torch.ones(1, 1, 1, 1), torch.tensor([1])
    w_ag, s = 2.0, 3.0
    den = Denoiser(main, cfg=GuidanceRule(s), autoguidance=GuidanceRule(w_ag), guide=guide)
    v = den(x, 0.5, y).item()
    cond = 1.5 + w_ag * (2.0 - 1.5)
    uncond = 0.4 + w_ag * (0.5 - 0.4)
    assert v == pytest.approx(uncond + s * (cond - uncond))
    assert den.network_passes == 2 and den.network_rows == 4


def test_autoguidance_refuses_a_guide_of_another_shape():
    main, guide = AffineBackbone(), AffineBackbone()
    guide.num_classes = 3
    with pytest.raises(ConfigError, match="guidance.autoguidance.num_classes"):
        Denoiser(main, autoguidance=GuidanceRule(2.0), guide=guide)
    with pytest.raises(ConfigError, match="needs a guide"):
        Denoiser(main, autoguidance=GuidanceRule(2.0))
