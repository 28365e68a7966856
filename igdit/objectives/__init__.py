"""Training objectives: a weighted sum of loss terms (base.py), one file per term.

IG's own terms: DiffusionLoss, ExitLoss, and the training-acceleration loss IGAccelLoss; LightningDiT's
CosineVelocityLoss. Self-Transcendence: VAEAlignLoss (stage 1), SelfGuidedLoss (stage 2). The baselines the IG and
Self-Transcendence papers compare with: REPALoss (with a PatchEncoder: DINOv2Encoder, DigitsPatchEncoder), SRALoss,
LayerSyncLoss, DispersiveLoss.
"""
from igdit.objectives.base import (
                                   Frozen,
                                   LossInputs,
                                   LossTerm,
                                   Objective,
                                   check_block,
                                   file_digest,
                                   mlp,
                                   per_sample_loss,
)
from igdit.objectives.cosine import CosineVelocityLoss, cosine_velocity_loss
from igdit.objectives.diffusion import DiffusionLoss
from igdit.objectives.dispersive import DispersiveLoss, dispersive_loss
from igdit.objectives.teachers import DigitsPatchEncoder, DINOv2Encoder, PatchEncoder
from igdit.objectives.exit import ExitLoss
from igdit.objectives.ig_accel import IGAccelLoss
from igdit.objectives.layersync import LayerSyncLoss
from igdit.objectives.repa import REPALoss
from igdit.objectives.self_guided import SelfGuidedLoss
from igdit.objectives.sra import SRALoss, TenfoldDecay
from igdit.objectives.vae_align import VAEAlignLoss

__all__ = ["CosineVelocityLoss", "DiffusionLoss", "DigitsPatchEncoder", "DINOv2Encoder", "DispersiveLoss", "ExitLoss",
           "Frozen", "IGAccelLoss", "LayerSyncLoss", "LossInputs", "LossTerm", "Objective", "PatchEncoder", "REPALoss",
           "SRALoss", "SelfGuidedLoss", "TenfoldDecay", "VAEAlignLoss", "check_block", "cosine_velocity_loss",
           "dispersive_loss", "file_digest", "mlp", "per_sample_loss"]
