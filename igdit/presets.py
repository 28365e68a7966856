"""Published sampling settings, one name away (edm2's ``config_presets``): the model each was published for,
its sampler and time grid, its guidance rules and label mode, and the FID the paper reports for it.

Intervals are in the project's time (t = 1 is noise). ``igdit sample --preset <name>`` applies one; options given
on the command line override its values.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from igdit.config import ConfigError
from igdit.generation import Sampling


@dataclass(frozen=True)
class Preset:
    """backbone: the registered model it was published for; guidance: {rule: {fields}} as in FIDCallback
    settings; labels: random or balanced; reported: the paper's number and where it is printed."""

    backbone: str
    sampling: Sampling
    guidance: dict = field(default_factory=dict)
    labels: str = "random"
    reported: str = ""


# LightningDiT's sampler (inference.py + yaml): ODE heun2, num_sampling_steps 125 grid points, timestep_shift 0.3.
LIGHTNINGDIT_HEUN = Sampling("heun", 124, "shifted", 0.3, heun_last_step="heun", heun_decide="evaluation")

PRESETS = {
    # SiT-XL/2 + IG, 800 epochs: FID-50K 1.46 with CFG, random labels (IG paper, main table; docs/method.md §8.3).
    # gen.sh: SDE 250 steps, CFG 1.35 for t <= 0.7 (GUIDANCE_HIGH), IG 1.4 at every step.
    "sit-xl2-ig-cfg": Preset("SiT-XL/2", Sampling("sde", 250),
                             {"ig": {"scale": 1.4}, "cfg": {"scale": 1.35, "interval": [0.0, 0.7]}},
                             "random", "FID-50K 1.46 (800 ep, random labels; IG paper main table)"),
    # SiT-B/2 + IG at 80 epochs without CFG: FID-50K 16.19 with w = 2.3 on [0.3, 1] (IG paper's SiT-B/2 ablation;
    # docs/numbers.md §4).
    "sit-b2-ig": Preset("SiT-B/2", Sampling("sde", 250), {"ig": {"scale": 2.3, "interval": [0.3, 1.0]}},
                        "random", "FID-50K 16.19 (80 ep, no CFG; IG paper ablation)"),
    # LightningDiT-XL/1 + IG, 680 epochs: FID-50K 1.19 with CFG (random labels), 1.07 class-balanced. torchdiffeq's
    # fixed-grid heun2 on 125 grid points (124 steps, full Heun last step) with time shift 0.3; CFG 1.45 where
    # LightningDiT's own shifted t >= 0.19 (cfg_interval_start; forward_with_cfg keeps the conditional half for
    # t < 0.19), i.e. project t <= 0.81, decided at every model call's own t (heun2 calls the guided model at both
    # ends of a step: at the boundary step CFG is off for the first evaluation, on for the second); IG 1.4 at
    # every call (inference.py never passes ig_interval). Config: LightningDiT/configs/lightningdit_xl_vavae_f16d32.yaml.
    "lightningdit-xl1-ig-cfg": Preset("LightningDiT-XL/1", LIGHTNINGDIT_HEUN,
                                      {"ig": {"scale": 1.4}, "cfg": {"scale": 1.45, "interval": [0.0, 0.81]}},
                                      "random", "FID-50K 1.19 (680 ep, random labels; 1.07 with balanced labels)"),
    # Without CFG: IG 1.7, otherwise the same: FID-50K 1.34 random labels (1.24 balanced).
    "lightningdit-xl1-ig": Preset("LightningDiT-XL/1", LIGHTNINGDIT_HEUN, {"ig": {"scale": 1.7}}, "random",
                                  "FID-50K 1.34 (680 ep, no CFG, random labels; 1.24 with balanced labels)"),
}


def get_preset(name: str, backbone=None, field: str = "--preset") -> Preset:
    """The preset called ``name``; with ``backbone``, a one-line ConfigError unless it is the model the setting
    was published for (a preset's scales and grid belong to that model)."""
    if name not in PRESETS:
        raise ConfigError(field, name, "choose one of " + ", ".join(PRESETS))
    preset = PRESETS[name]
    if backbone is not None and backbone.name != preset.backbone:
        raise ConfigError(field, name, f"was published for {preset.backbone}; this checkpoint is a {backbone.name}")
    return preset
