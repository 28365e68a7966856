"""Data: image sources -> encoder + normaliser -> WebDataset shards -> LatentDataModule.

The names below load their module on first use (PEP 562), so that a part that needs only the encoders (a sampler
decoding latents, `igdit sample --help`) does not import Lightning and WebDataset with the data module."""
import importlib

_WHERE = {
    "igdit.data.datamodule": ("LatentDataModule", "resolve_shards", "shard_subsets"),
    "igdit.data.encoders": ("ENCODERS", "DiffusersVAE", "IdentityEncoder", "LatentEncoder", "LatentNormalizer",
                            "build_encoder", "decode_latents", "images_to_unit", "unit_to_uint8"),
    "igdit.data.shards": ("build_dataset", "bytes_per_sample", "load_meta"),
    "igdit.data.sources": ("SOURCES", "ArraySource", "ImageFolderSource", "ImageSource", "center_crop_arr",
                           "load_source"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'igdit.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
