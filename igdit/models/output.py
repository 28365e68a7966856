"""What one forward pass of a backbone returns (docs/design.md, contract 2)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class DiTOutput:
    """Predictions and features of one forward pass.

    final:  (N, C, H, W) velocity predicted by the final head (None when the pass stopped early).
    exits:  1-based block index -> (N, C, H, W) velocity predicted by the exit head after that block;
            only the exits the caller asked for are present.
    hidden: 1-based block index -> (N, T, D) token states after that block (T tokens, width D);
            only the blocks the caller asked for are present.
    """

    final: Optional[torch.Tensor]
    exits: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
