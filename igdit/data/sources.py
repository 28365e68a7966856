"""Image sources: where the pictures come from before they are encoded into latent shards.

A source is named on the command line as ``name`` or ``name:arg`` (``digits``,
``imagefolder:/path/to/imagenet/train``). ``SOURCES`` maps the name to a loader
``loader(arg, resolution) -> ImageSource``; adding a source is adding one function and one registry entry.

A source lists its images and labels up front but reads pixels one image at a time (``read(row)``), so a
build streams ImageNet's 1.28M files in chunks instead of holding them in memory. Small sources that
ship as arrays (digits) are an ``ArraySource`` whose ``read`` is an index into the array.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from igdit.config import ConfigError, check_number

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


class UnreadableImage(Exception):
    """An image file that cannot be decoded (corrupt, truncated, not an image). A build reports and skips it."""

    def __init__(self, where: str, error: BaseException):
        self.where, self.error = where, f"{type(error).__name__}: {error}"
        super().__init__(f"{where}: {self.error}")


class ImageSource:
    """Labelled images, listed up front and read one at a time.

    labels: (N,) long in [0, len(class_names)); description: plain JSON-able facts about the source, copied
    into meta.json; image_shape: (C, H, W) of what ``read`` returns.
    """

    labels: torch.Tensor
    class_names: list[str]
    description: dict

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    def read(self, row: int) -> torch.Tensor:
        """Image ``row`` as (C, H, W) uint8 in [0, 255]; raises ``UnreadableImage`` when it cannot be decoded."""
        raise NotImplementedError

    def where(self, row: int) -> str:
        """Where image ``row`` comes from (a file path, or the row), for reports of skipped images."""
        return f"row {row}"

    def fingerprint(self) -> str:
        """sha256 of what identifies the listing (names and labels): a resumed build checks it is unchanged."""
        return hashlib.sha256(self.labels.numpy().tobytes()).hexdigest()


@dataclass
class ArraySource(ImageSource):
    """A labelled image set held in memory (small sources such as digits).

    images: (N, C, H, W) uint8 in [0, 255]; labels: (N,) long in [0, len(class_names)).
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

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    def read(self, row: int) -> torch.Tensor:
        return self.images[row]

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.images.numpy().tobytes())
        digest.update(self.labels.numpy().tobytes())
        return digest.hexdigest()


def load_digits(arg: Optional[str] = None, resolution: Optional[int] = None) -> ArraySource:
    """scikit-learn's hand-written digits: 1,797 real 8x8 greyscale images of 0..9 (ships with the package).

    The 17 grey levels 0..16 become uint8 as round(v * 255 / 16), so 16 -> 255 and 8 -> 128.
    Returns images (1797, 1, 8, 8) uint8 and labels (1797,) long; ``resolution`` is applied by the build
    (bilinear upsampling), not here.
    """
    if arg is not None:
        raise ConfigError("source", f"digits:{arg}", "the digits source takes no argument; write 'digits'")
    from sklearn.datasets import load_digits as sklearn_digits  # imported here: sklearn is slow to import

    digits = sklearn_digits()
    levels = np.rint(digits.images * 255.0 / 16.0).astype(np.uint8)
    return ArraySource(
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


def center_crop_arr(image, image_size: int):
    """ADM's preprocessing (guided-diffusion ``image_datasets.center_crop_arr``), as SiT/REPA use it for ImageNet.

    While the short side is >= 2 x image_size, halve the image with BOX filtering; then a BICUBIC resize
    makes the short side image_size (each side rounded); then the centre image_size x image_size crop
    (offsets rounded down). image: a PIL image; returns an (image_size, image_size, channels) uint8 array.
    """
    from PIL import Image

    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


class ImageFolderSource(ImageSource):
    """``imagefolder:<dir>``: one sub-folder per class (ImageNet's train layout ``<dir>/n01440764/*.JPEG``).

    Classes are the sorted sub-folder names (label = index), images the files with an image extension
    found under each class folder (recursively, sorted). Each image is read as RGB and ADM-centre-cropped
    to resolution x resolution; a file PIL cannot decode raises ``UnreadableImage`` (the build reports it).
    """

    def __init__(self, root: str, resolution: int):
        self.root, self.resolution = Path(root).expanduser().resolve(), int(resolution)
        spec = f"imagefolder:{root}"
        if not self.root.is_dir():
            raise ConfigError("source", spec, "is not a folder; write imagefolder:/path/to/train "
                              "(one sub-folder of images per class)")
        classes = sorted(d.name for d in os.scandir(self.root) if d.is_dir() and not d.name.startswith("."))
        paths, labels = [], []
        for label, name in enumerate(classes):
            found = []
            for folder, subfolders, files in os.walk(self.root / name):
                subfolders[:] = sorted(s for s in subfolders if not s.startswith("."))
                found += [os.path.join(folder, f) for f in files
                          if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
            if not found:
                raise ConfigError("source", spec, f"has a class folder '{name}' with no images "
                                  f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add its images")
            paths += sorted(found)
            labels += [label] * len(found)
        if not paths:
            raise ConfigError("source", spec, f"holds no images: expected one sub-folder per class with "
                              f"{', '.join(IMAGE_EXTENSIONS)} files, as <dir>/<class>/<image>.JPEG")
        # A numpy array, not a list of 1.28M str objects: DataLoader workers fork with it, and reading Python
        # objects touches their refcounts, which copies the pages into every worker.
        self.paths = np.array([os.path.relpath(p, self.root) for p in paths])
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.class_names = classes
        self.description = {
            "name": "imagefolder",
            "root": str(self.root),
            "num_images": len(self.paths),
            "num_classes": len(classes),
            "extensions": list(IMAGE_EXTENSIONS),
            "preprocess": "RGB; ADM center crop (guided-diffusion center_crop_arr): BOX halving while the short "
                          "side >= 2 x resolution, BICUBIC resize of the short side to resolution, centre crop",
        }

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.resolution, self.resolution)

    def where(self, row: int) -> str:
        return str(self.root / str(self.paths[row]))

    def read(self, row: int) -> torch.Tensor:
        from PIL import Image

        path = self.where(row)
        try:
            with Image.open(path) as image:
                image.load()  # decode now: a truncated or corrupt file fails here, not later
                arr = center_crop_arr(image.convert("RGB"), self.resolution)
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            raise UnreadableImage(path, err) from err
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()

    def fingerprint(self) -> str:
        digest = hashlib.sha256("\n".join(self.paths).encode())
        digest.update(self.labels.numpy().tobytes())
        return digest.hexdigest()


def load_imagefolder(arg: Optional[str] = None, resolution: Optional[int] = None) -> ImageFolderSource:
    """``imagefolder:<dir>`` at resolution x resolution (required: the files differ in size)."""
    if not arg:
        raise ConfigError("source", "imagefolder", "write imagefolder:/path/to/train (one sub-folder per class)")
    if resolution is None:
        raise ConfigError("resolution", None, "imagefolder needs --resolution, e.g. 256 for ImageNet 256x256 "
                          "(ADM center crop)")
    check_number("resolution", resolution, low=1, integer=True)
    return ImageFolderSource(arg, resolution)


SOURCES: dict[str, Callable[[Optional[str], Optional[int]], ImageSource]] = {
    "digits": load_digits,
    "imagefolder": load_imagefolder,
}


def parse_source(spec: str) -> tuple[str, Optional[str]]:
    """Split ``name`` or ``name:arg`` and check that the name is registered (ConfigError on field ``source``)."""
    allowed = "choose one of " + ", ".join(repr(s) for s in SOURCES) + " (imagefolder:<dir>)"
    if not isinstance(spec, str) or not spec:
        raise ConfigError("source", spec, allowed)
    name, _, arg = spec.partition(":")
    if name not in SOURCES:
        raise ConfigError("source", spec, allowed)
    return name, (arg or None)


def load_source(spec: str, resolution: Optional[int] = None) -> ImageSource:
    """Load the source named by ``spec`` (``name`` or ``name:arg``): its listing, not yet its pixels."""
    name, arg = parse_source(spec)
    return SOURCES[name](arg, resolution)
