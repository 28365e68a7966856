"""A Lightning CheckpointIO for the paper-scale CPU smoke runs: it writes a checkpoint straight into a file beside
its target and renames it into place: the same bytes, and the same atomicity on a local file system, as Lightning's
TorchCheckpointIO, which serialises the whole checkpoint into memory first (``_atomic_save``: a BytesIO) and so
needs its size again in host memory (6.3 GB for SiT-XL/2 in bf16), more than a 24 GB machine shared with other
work has free besides the run itself."""
import os

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class StreamingCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = os.fspath(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.partial"
        torch.save(checkpoint, partial)
        os.replace(partial, path)
