"""Guidance rules composed around a backbone. The IG rule is ``internal_guidance`` in internal.py."""
from igdit.guidance.autoguidance import Autoguidance, autoguidance
from igdit.guidance.base import (RULES, Denoiser, GuidanceRule, build_rules, describe, extrapolate,
                                 parse_settings)
from igdit.guidance.cfg import ClassifierFreeGuidance, classifier_free_guidance
from igdit.guidance.internal import InternalGuidance, internal_guidance

__all__ = ["RULES", "Autoguidance", "ClassifierFreeGuidance", "Denoiser", "GuidanceRule", "InternalGuidance",
           "autoguidance", "build_rules", "classifier_free_guidance", "describe", "extrapolate",
           "internal_guidance", "parse_settings"]
