"""Guidance rules: the IG rule, Autoguidance, CFG, their order, their intervals and their cost, on a stand-in
backbone with known outputs; settings and presets built from the rule classes."""
import pytest
import torch
from jsonargparse import ArgumentError

from igdit.config import ConfigError
from igdit.generation import Sampling
from igdit.guidance import (RULES, Autoguidance, ClassifierFreeGuidance, Denoiser, GuidanceRule, InternalGuidance,
                            build_rules, classifier_free_guidance, describe, internal_guidance, parse_settings)
from igdit.models.output import DiTOutput
from igdit.presets import PRESETS, get_preset
from igdit.samplers import euler_ode, time_grid, uniform_grid


class AffineBackbone(torch.nn.Module):
    """final = a_y * x, exit(2) = b_y * x for label y (null label 2): every output is known in closed form."""

    num_classes, latent_shape = 2, (1, 1, 1)
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
    den = Denoiser(backbone, [ClassifierFreeGuidance(s), InternalGuidance(w)])  # listed in any order
    v = den(x, 0.5, y)
    cond = 1.0 + w * (2.0 - 1.0)      # exit 1.0, final 2.0 for label 1
    uncond = 0.25 + w * (0.5 - 0.25)  # exit 0.25, final 0.5 for the null label
    assert v.item() == pytest.approx(uncond + s * (cond - uncond))
    assert backbone.calls == [(2, (2,))]  # one pass on the doubled batch, exit head requested once


def test_intervals_are_inclusive_and_cost_nothing_outside():
    backbone = AffineBackbone()
    den = Denoiser(backbone, [InternalGuidance(2.0, (0.3, 0.7)), ClassifierFreeGuidance(2.0, (0.5, 1.0))])
    x, y = torch.ones(4, 1, 1, 1), torch.zeros(4, dtype=torch.long)
    for t in (0.0, 0.3, 0.5, 0.7, 0.71, 1.0):
        den(x, t, y)
    batch_sizes = [c[0] for c in backbone.calls]
    exits = [c[1] for c in backbone.calls]
    assert batch_sizes == [4, 4, 8, 8, 8, 8]       # CFG doubles only for t in [0.5, 1]
    assert exits == [(), (2,), (2,), (2,), (), ()]  # exit head only for t in [0.3, 0.7]


def test_rules_decide_at_the_time_they_are_told():
    backbone = AffineBackbone()
    den = Denoiser(backbone, [ClassifierFreeGuidance(2.0, (0.0, 0.55))])
    x, y = torch.ones(2, 1, 1, 1), torch.zeros(2, dtype=torch.long)
    den(x, 0.5, y, decide_at=0.6)  # Heun's second evaluation of the step that starts at 0.6
    den(x, 0.5, y)
    assert [c[0] for c in backbone.calls] == [2, 4]


def test_euler_counts_one_forward_pass_per_step_with_or_without_ig():
    noise, y = torch.randn(3, 1, 2, 2), torch.zeros(3, dtype=torch.long)
    for rules in ([], [InternalGuidance(2.0)]):
        _, nfe = euler_ode(Denoiser(AffineBackbone(), rules), noise, y, uniform_grid(17))
        assert nfe == 17


def test_euler_solves_linear_ode_to_first_order():
    # v = a x with a = 1 for label 0: x(0) = x(1) * exp(-1); Euler with N steps has O(1/N) error.
    noise, y = torch.ones(1, 1, 1, 1), torch.zeros(1, dtype=torch.long)
    errs = [abs(euler_ode(Denoiser(AffineBackbone()), noise, y, uniform_grid(n))[0].item() - torch.e ** -1)
            for n in (50, 100)]
    assert errs[1] < errs[0] * 0.6 and errs[1] < 5e-3


def test_bad_guidance_values():
    with pytest.raises(ConfigError, match=r"guidance.ig.interval"):
        InternalGuidance(2.0, (0.8, 0.2))
    with pytest.raises(ConfigError, match=r"guidance.ig.interval"):
        build_rules({"ig": {"scale": 2.0, "interval": [0.8, 0.2]}}, "guidance")
    with pytest.raises(ConfigError, match=r"guidance.cfg.*scale"):
        build_rules({"cfg": {"scale": -1.0}}, "guidance")
    no_exit = AffineBackbone()
    no_exit.exit_indices = ()
    with pytest.raises(ConfigError, match=r"exits \[\]"):
        Denoiser(no_exit, [InternalGuidance(2.0)])
    with pytest.raises(ConfigError, match="each rule may appear once"):
        Denoiser(AffineBackbone(), [InternalGuidance(2.0), InternalGuidance(1.5)])


def test_autoguidance_inside_each_branch_after_ig_before_cfg():
    main, guide = AffineBackbone(), AffineBackbone()
    guide.a = torch.tensor([0.5, 1.5, 0.4])
    x, y = torch.ones(1, 1, 1, 1), torch.tensor([1])
    w_ig, w_ag, s = 1.5, 2.0, 3.0
    den = Denoiser(main, [ClassifierFreeGuidance(s), Autoguidance(w_ag).use_guide(guide), InternalGuidance(w_ig)])
    v = den(x, 0.5, y).item()
    cond = 1.5 + w_ag * ((1.0 + w_ig * (2.0 - 1.0)) - 1.5)       # IG first, then AG against the guide's 1.5
    uncond = 0.4 + w_ag * ((0.25 + w_ig * (0.5 - 0.25)) - 0.4)
    assert v == pytest.approx(uncond + s * (cond - uncond))
    assert den.network_passes == 2 and den.network_rows == 4


def test_autoguidance_refuses_a_guide_of_another_shape_and_needs_one():
    main, guide = AffineBackbone(), AffineBackbone()
    guide.num_classes = 3
    with pytest.raises(ConfigError, match="guidance.ag.ckpt.*num_classes"):
        Denoiser(main, [Autoguidance(2.0).use_guide(guide)])
    with pytest.raises(ConfigError, match="needs a guide"):
        Denoiser(main, [Autoguidance(2.0)])
    with pytest.raises(ConfigError, match="guidance.ag.ckpt.*is not a file"):
        Denoiser(torch.nn.Linear(1, 1), [Autoguidance(2.0, ckpt="no/such.ckpt")])


# ---- settings, flags and presets come from the rule classes -------------------------------------------------
def test_registered_rules_have_keys_phases_and_an_order():
    assert {"ig", "cfg", "ag"} <= set(RULES)
    assert RULES["ig"].acts == RULES["ag"].acts == "branch" and RULES["cfg"].acts == "across"
    assert RULES["ig"].order < RULES["ag"].order


def test_settings_are_built_and_type_checked_from_the_rule_classes():
    settings = parse_settings({"none": {}, "both": {"ig": {"scale": 2.0, "exit": 2},
                                                    "cfg": {"scale": 1.5, "interval": [0.0, 0.7]}}}, "settings")
    assert settings["none"] == []
    assert describe(settings["both"]) == {"ig": {"scale": 2.0, "interval": [0.0, 1.0], "exit": 2},
                                          "cfg": {"scale": 1.5, "interval": [0.0, 0.7]}}
    by_path = parse_settings({"x": {"igdit.guidance.ClassifierFreeGuidance": {"scale": 1.2}}}, "settings")
    assert isinstance(by_path["x"][0], ClassifierFreeGuidance)
    for bad, field in [({"x": {"nope": {}}}, "settings.x.nope"), ({"x": {"ig": {"scale": "big"}}}, "settings.x.ig"),
                       ({"bad name": {}}, "settings"), ({"x": {"ig": {"what": 1}}}, "settings.x.ig")]:
        with pytest.raises((ConfigError, ArgumentError), match=field.replace(".", r"\.")):
            parse_settings(bad, "settings")


def test_a_rule_is_a_guidance_rule_subclass():
    assert all(issubclass(rule, GuidanceRule) for rule in RULES.values())


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_carries_its_documented_setting(name):
    preset = PRESETS[name]
    rules = {r.key: r for r in build_rules(preset.guidance, "preset")}
    expected = {
        "sit-xl2-ig-cfg": ("SiT-XL/2", "sde", 250, None, {"ig": (1.4, (0, 1)), "cfg": (1.35, (0, 0.7))}, "1.46"),
        "sit-b2-ig": ("SiT-B/2", "sde", 250, None, {"ig": (2.3, (0.3, 1))}, "16.19"),
        "lightningdit-xl1-ig-cfg": ("LightningDiT-XL/1", "heun", 124, "shifted",
                                    {"ig": (1.4, (0, 1)), "cfg": (1.45, (0, 0.81))}, "1.19"),
        "lightningdit-xl1-ig": ("LightningDiT-XL/1", "heun", 124, "shifted", {"ig": (1.7, (0, 1))}, "1.34"),
    }[name]
    backbone, sampler, steps, schedule, guidance, fid = expected
    assert (preset.backbone, preset.sampling.sampler, preset.sampling.steps, preset.sampling.schedule) == \
        (backbone, sampler, steps, schedule)
    assert {k: (r.scale, tuple(r.interval)) for k, r in rules.items()} == guidance
    assert fid in preset.reported
    if schedule == "shifted":  # LightningDiT: 125 grid points, shift 0.3, full Heun last step (248 NFE)
        grid = time_grid("shifted", steps, preset.sampling.shift)
        assert len(grid) == 125 and preset.sampling.shift == 0.3 and preset.sampling.heun_last_step == "heun"


def test_a_preset_refuses_a_model_it_was_not_published_for():
    class Named:
        name = "SiT-B/2"
    assert get_preset("sit-b2-ig", Named()).backbone == "SiT-B/2"
    with pytest.raises(ConfigError, match="--preset.*SiT-XL/2"):
        get_preset("sit-xl2-ig-cfg", Named())
    with pytest.raises(ConfigError, match="--preset"):
        get_preset("nope")


def test_sampling_describes_itself_for_logs():
    assert Sampling("heun", 124, "shifted", 0.3, "heun").describe() == {
        "sampler": "heun", "steps": 124, "schedule": "shifted", "shift": 0.3, "heun_last_step": "heun",
        "heun_decide": "step"}
