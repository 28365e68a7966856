"""REPA (Yu et al., ICLR 2025): align a block's hidden state, through a projector, with a frozen encoder's patch
features of the clean image (docs/method.md §12.1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat, PositiveInt

from igdit.config import ConfigError
from igdit.objectives.base import LossInputs, LossTerm, check_block, mlp
from igdit.objectives.teachers import PatchEncoder


def negative_token_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, T, F), (N, T, F) -> (N,): minus the cosine similarity of each token pair (both sides l2-normalised per
    token, as REPA's F.normalize(dim=-1)), averaged over the tokens."""
    pred, target = F.normalize(pred.float(), dim=-1), F.normalize(target.float(), dim=-1)
    return -(pred * target).sum(-1).mean(1)


class REPALoss(LossTerm):
    """L = -mean_tokens cos(h_phi(h[block]), y*) per sample, batch mean; y* = the encoder's patch features of x.

    encoder: a ``PatchEncoder`` by class_path (``DINOv2Encoder`` at paper scale, ``DigitsPatchEncoder`` on
        digits); frozen, loaded at fit start, never trained, averaged or saved.
    weight: lambda, 0.5 (REPA ``--proj-coeff``). block: the 1-based block whose output is aligned (8 for SiT-XL/2,
        REPA's ``--encoder-depth``; igdit's hidden state after block i = REPA's ``(i + 1) == encoder_depth``).
    projector_dim: h of the projector Linear(D, h)-SiLU-Linear(h, h)-SiLU-Linear(h, F), 2048 as REPA.
    interpolate: resize the encoder's token grid bilinearly to the backbone's when they differ (default: a
        differing grid is a configuration error). No t-mask by default: REPA aligns at every t.
    """

    def __init__(self, encoder: PatchEncoder, weight: NonNegativeFloat = 0.5, block: PositiveInt = 8,
                 projector_dim: PositiveInt = 2048, interpolate: bool = False, **kwargs):
        super().__init__(weight=weight, **kwargs)
        self.encoder, self.block = encoder, block
        self.projector_dim, self.interpolate = int(projector_dim), bool(interpolate)

    def attach(self, backbone, transport) -> None:
        super().attach(backbone, transport)
        check_block(self.field("block"), self.block, backbone.depth)
        self.grid_size = backbone.grid_size
        if self.encoder.grid_size != backbone.grid_size and not self.interpolate:
            raise ConfigError(self.field("encoder"), type(self.encoder).__name__,
                              f"gives a {self.encoder.grid_size}x{self.encoder.grid_size} token grid and the backbone "
                              f"has {backbone.grid_size}x{backbone.grid_size} tokens; match them or set "
                              f"{self.field('interpolate')}: true")
        self.projector = mlp(backbone.hidden_size, self.projector_dim, self.projector_dim, self.encoder.num_features)

    def setup(self, device: torch.device, datamodule=None) -> None:
        self.encoder.load(self.field("encoder"), datamodule)

    def frozen_networks(self) -> dict[str, dict]:
        return {} if self.encoder.frozen is None else {"encoder": self.encoder.frozen.describe()}

    def hidden_needed(self, step: int) -> tuple[int, ...]:
        return (self.block,)

    def target_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) clean images -> (N, T, F) encoder features on the backbone's token grid (no gradient)."""
        features = self.encoder.features(images)
        g = self.encoder.grid_size
        if g != self.grid_size:
            grid = features.transpose(1, 2).reshape(features.shape[0], -1, g, g)
            grid = F.interpolate(grid, size=(self.grid_size, self.grid_size), mode="bilinear", align_corners=False)
            features = grid.flatten(2).transpose(1, 2)
        return features

    def per_sample(self, inputs: LossInputs) -> torch.Tensor:
        target = self.target_features(inputs.images())
        return negative_token_cosine(self.projector(inputs.output.hidden[self.block]), target)
