"""Data: image sources -> encoder + normaliser -> WebDataset shards -> LatentDataModule."""
from igdit.data.datamodule import LatentDataModule, resolve_shards
from igdit.data.encoders import (ENCODERS, IdentityEncoder, LatentEncoder, LatentNormalizer, build_encoder,
                                 images_to_unit, unit_to_uint8)
from igdit.data.shards import build_dataset, load_meta
from igdit.data.sources import SOURCES, ImageSource, load_source

__all__ = [
    "LatentDataModule", "resolve_shards",
    "ENCODERS", "IdentityEncoder", "LatentEncoder", "LatentNormalizer", "build_encoder", "images_to_unit",
    "unit_to_uint8",
    "build_dataset", "load_meta",
    "SOURCES", "ImageSource", "load_source",
]
