"""Data: image sources -> encoder + normaliser -> WebDataset shards -> LatentDataModule."""
from igdit.data.datamodule import LatentDataModule, resolve_shards, shard_subsets
from igdit.data.encoders import (ENCODERS, DiffusersVAE, IdentityEncoder, LatentEncoder, LatentNormalizer, build_encoder,
                                 decode_latents, images_to_unit, unit_to_uint8)
from igdit.data.shards import build_dataset, bytes_per_sample, load_meta
from igdit.data.sources import SOURCES, ArraySource, ImageFolderSource, ImageSource, center_crop_arr, load_source

__all__ = [
    "LatentDataModule", "resolve_shards", "shard_subsets",
    "ENCODERS", "DiffusersVAE", "IdentityEncoder", "LatentEncoder", "LatentNormalizer", "build_encoder",
    "decode_latents", "images_to_unit", "unit_to_uint8",
    "build_dataset", "bytes_per_sample", "load_meta",
    "SOURCES", "ArraySource", "ImageFolderSource", "ImageSource", "center_crop_arr", "load_source",
]
