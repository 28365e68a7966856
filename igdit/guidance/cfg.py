"""Classifier-free guidance across the conditional and unconditional branches (Ho & Salimans 2022)."""
from __future__ import annotations

import torch

from igdit.guidance.base import GuidanceRule, extrapolate


def classifier_free_guidance(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG on all latent channels: v = v_u + s (v_c - v_u); s = 1 returns v_cond exactly. (DiT, SiT and LightningDiT
    guide only the first 3 channels for reproducibility of a bug; the IG code fixed it, as here.)"""
    return extrapolate(v_uncond, v_cond, scale)


class ClassifierFreeGuidance(GuidanceRule):
    """CFG against the null label (``backbone.num_classes``); the batch is doubled only inside the interval."""

    key = "cfg"
    acts = "across"
    order = 100

    def combine(self, v_cond: torch.Tensor, v_uncond: torch.Tensor) -> torch.Tensor:
        return classifier_free_guidance(v_cond, v_uncond, self.scale)
