"""Image sources: where the pictures come from before they are encoded into latent shards.

A source is named on the command line as ``name`` or ``name:arg`` (``digits``; later
``imagefolder:/path/to/train``). ``SOURCES`` maps the name to a loader ``loader(arg) -> ImageSource``;
adding a source is adding one function and one registry entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from igdit.config import ConfigError


@dataclass
class ImageSource:
    """A labelled image set held in memory.

    images: (N, C, H, W) uint8 in [0, 255]; labels: (N,) long in [0, len(class_names));
    description: plain JSON-able facts about the source, copied into meta.json.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    description: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W) uint8, got {tuple(self.images.shape)} {self.images.dtype}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be ({self.images.shape[0]},), got {tuple(self.labels.shape)}")


def load_digits(arg: Optional[str] = None) -> ImageSource:
    """scikit-learn's hand-written digits: 1,797 real 8x8 greyscale images of 0..9 (ships with the package).

    The 17 grey levels 0..16 become uint8 as round(v * 255 / 16), so 16 -> 255 and 8 -> 128.
    Returns images (1797, 1, 8, 8) uint8 and labels (1797,) long.
    """
    if arg is not None:
        raise ConfigError("source", f"digits:{arg}", "the digits source takes no argument; write 'digits'")
    from sklearn.datasets import load_digits as sklearn_digits  # imported here: sklearn is slow to import

    digits = sklearn_digits()
    levels = np.rint(digits.images * 255.0 / 16.0).astype(np.uint8)
    return ImageSource(
        images=torch.from_numpy(levels).unsqueeze(1),
        labels=torch.from_numpy(digits.target.astype(np.int64)),
        class_names=[str(int(c)) for c in digits.target_names],
        description={
            "name": "digits",
            "origin": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits)",
            "num_images": int(levels.shape[0]),
            "grey_levels": 17,
            "to_uint8": "round(v * 255 / 16)",
        },
    )


SOURCES: dict[str, Callable[[Optional[str]], ImageSource]] = {"digits": load_digits}


def parse_source(spec: str) -> tuple[str, Optional[str]]:
    """Split ``name`` or ``name:arg`` and check that the name is registered (ConfigError on field ``source``)."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError("source", spec, "choose one of " + ", ".join(repr(s) for s in SOURCES))
    name, _, arg = spec.partition(":")
    if name not in SOURCES:
        raise ConfigError("source", spec, "choose one of " + ", ".join(repr(s) for s in SOURCES))
    return name, (arg or None)


def load_source(spec: str) -> ImageSource:
    """Load the source named by ``spec`` (``name`` or ``name:arg``)."""
    name, arg = parse_source(spec)
    return SOURCES[name](arg)
