"""The cosine-similarity velocity loss LightningDiT trains its final head with (``use_cosine_loss: true``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from igdit.objectives.base import LossInputs, LossTerm


def cosine_velocity_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) predicted and target velocities -> (N,): the mean over positions (h, w) of 1 - cos, the
    cosine taken across the C latent channels at each position (float32).

    The official transport computes ``mean_flat(1 - cosine_similarity(out, u, dim=1))`` with u = data - noise;
    igdit's velocity is noise - data and the backbone negates LightningDiT's output, so both vectors flip sign
    and the cosine is the same.
    """
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=1)).flatten(1).mean(1)


class CosineVelocityLoss(LossTerm):
    """1 - cos(v_final, v_target) over latent channels, averaged over positions, on the final head only.

    LightningDiT (+IG) adds it with weight 1 to the MSE of the final head and of the exit head
    (``loss = cos_loss.mean() + mse_loss.mean()`` in its train.py); the exit head gets no cosine term. It
    composes with ``DiffusionLoss`` and ``ExitLoss`` as one more entry in ``model.terms``.
    """

    def per_sample(self, inputs: LossInputs) -> torch.Tensor:
        return cosine_velocity_loss(inputs.output.final, inputs.target)
