"""Training objectives: a weighted sum of loss terms (base.py), one file per term."""
from igdit.objectives.base import Frozen, LossInputs, LossTerm, Objective, file_digest, per_sample_loss
from igdit.objectives.diffusion import DiffusionLoss
from igdit.objectives.exit import ExitLoss
from igdit.objectives.ig_accel import IGAccelLoss
from igdit.objectives.self_guided import SelfGuidedLoss
from igdit.objectives.vae_align import VAEAlignLoss

__all__ = ["DiffusionLoss", "ExitLoss", "Frozen", "IGAccelLoss", "LossInputs", "LossTerm", "Objective",
           "SelfGuidedLoss", "VAEAlignLoss", "file_digest", "per_sample_loss"]
