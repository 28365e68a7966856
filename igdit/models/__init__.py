"""Backbones by name: ``"SiT-XL/2"`` is size XL with patch size 2 (the DiT/SiT naming)."""
from __future__ import annotations

from typing import Optional, Sequence

from igdit.config import ConfigError
from igdit.models.output import DiTOutput
from igdit.models.sit import SiT, exit_head_name

MODEL_SIZES = {
    "T": dict(depth=6, hidden_size=128, num_heads=4),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
PATCH_SIZES = (1, 2, 4, 8)
MODEL_NAMES = [f"SiT-{size}/{patch}" for size in MODEL_SIZES for patch in PATCH_SIZES]


def build_backbone(name: str, *, input_size: int, in_channels: int, num_classes: int, exits: Sequence[int],
                   qk_norm: bool = False, learn_sigma: bool = False, depth: Optional[int] = None,
                   hidden_size: Optional[int] = None, num_heads: Optional[int] = None) -> SiT:
    """Build a registered backbone; ``depth``, ``hidden_size``, ``num_heads`` override the named size."""
    if name not in MODEL_NAMES:
        raise ConfigError("model.name", name, "choose one of " + ", ".join(MODEL_NAMES))
    size, patch = name[len("SiT-"):].split("/")
    arch = dict(MODEL_SIZES[size])
    overrides = dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads)
    arch.update({key: value for key, value in overrides.items() if value is not None})
    return SiT(input_size=input_size, patch_size=int(patch), in_channels=in_channels, num_classes=num_classes,
               exits=exits, qk_norm=qk_norm, learn_sigma=learn_sigma, **arch)


__all__ = ["SiT", "DiTOutput", "build_backbone", "MODEL_NAMES", "MODEL_SIZES", "exit_head_name"]
