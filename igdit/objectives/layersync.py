"""LayerSync (Haghighi et al., ICLR 2026; vita-epfl/LayerSync): a shallow block's tokens align with a deeper
block's tokens of the same pass, the deeper side held fixed (docs/method.md §12.3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat, PositiveInt

from igdit.config import ConfigError
from igdit.objectives.base import LossInputs, LossTerm, check_block


class LayerSyncLoss(LossTerm):
    """L = mean over tokens of -cos(h[block], sg(h[target_block])) per sample (both l2-normalised per token), batch
    mean; lambda 0.2. No projector and no other network: the target is the same forward pass's deeper block,
    detached, so it receives no gradient through this term.

    block, target_block: 1-based, block < target_block; 8 and 16 for SiT-XL/2 (README: --encoder-depth 8
    --gt-encoder-depth 16).
    """

    def __init__(self, weight: NonNegativeFloat = 0.2, block: PositiveInt = 8, target_block: PositiveInt = 16,
                 **kwargs):
        super().__init__(weight=weight, **kwargs)
        self.block, self.target_block = block, target_block

    def attach(self, backbone, transport) -> None:
        super().attach(backbone, transport)
        check_block(self.field("block"), self.block, backbone.depth)
        check_block(self.field("target_block"), self.target_block, backbone.depth)
        if self.block >= self.target_block:
            raise ConfigError(self.field("block"), self.block, f"must come before target_block {self.target_block} "
                                                               "(a shallow block follows a deeper one)")

    def hidden_needed(self, step: int) -> tuple[int, ...]:
        return (self.block, self.target_block)

    def per_sample(self, inputs: LossInputs) -> torch.Tensor:
        h = F.normalize(inputs.output.hidden[self.block].float(), dim=-1)
        target = F.normalize(inputs.output.hidden[self.target_block].detach().float(), dim=-1)
        return -(h * target).sum(-1).mean(1)
