"""Training objectives: a weighted sum of loss terms (base.py), one file per term."""
from igdit.objectives.base import Frozen, LossInputs, LossTerm, Objective, file_digest, per_sample_loss
from igdit.objectives.cosine import CosineVelocityLoss, cosine_velocity_loss
from igdit.objectives.diffusion import DiffusionLoss
from igdit.objectives.exit import ExitLoss

__all__ = ["CosineVelocityLoss", "DiffusionLoss", "ExitLoss", "Frozen", "LossInputs", "LossTerm", "Objective",
           "cosine_velocity_loss", "file_digest", "per_sample_loss"]
