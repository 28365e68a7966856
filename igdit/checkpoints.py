"""Checkpoints: writing them whole (``AtomicCheckpointIO``) and reading igdit's own (safely, old layouts included:
``igdit.models.loading``) into a whole IGDiTModule; the official ones are imported by ``igdit.official``.

``load_module`` rebuilds an ``IGDiTModule`` from any igdit checkpoint with ``torch.load(weights_only=True)``:
its hyper-parameters are the model's config (class_path dicts), and checkpoints written before the parts were
injected (a backbone *name*, ``diffusion_loss`` / ``exit_loss`` / ``optimizer`` dicts) are converted on load.
An imported official checkpoint carries its decoder and normaliser (``igdit_data_meta``) like a trained one.
A network that is only read (a teacher, a guide) loads as a backbone with ``igdit.models.load_backbone``.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from igdit.config import ConfigError
from igdit.models.loading import WEIGHTS, load_failure, model_config, read_checkpoint, weights_of
from igdit.module import build_module

__all__ = ["WEIGHTS", "AtomicCheckpointIO", "load_failure", "load_module", "model_config", "newest_checkpoint",
           "read_checkpoint", "save_atomically"]


def load_module(path: str | Path, field: str = "--ckpt", device: str | torch.device = "cpu",
                weights: str = "ema"):
    """An IGDiTModule (in eval mode, on ``device``) from an igdit checkpoint.

    weights: "ema" (the checkpoint's ``state_dict``, where EMAWeightAveraging puts the averaged weights) or
    "raw" (``current_model_state``, the weights the optimiser trained). The shards' meta.json (encoder and
    normaliser) comes back as ``module.data_meta``.
    """
    checkpoint = read_checkpoint(path, field)
    module = build_module(model_config(checkpoint["hyper_parameters"]))
    module.load_state_dict(weights_of(checkpoint, weights, field, path), strict=True)
    module.data_meta = checkpoint.get("igdit_data_meta")
    return module.eval().to(device)


# ---- writing checkpoints whole ----------------------------------------------------------------------------------
class _CountingWriter:
    """Passes torch.save's writes to a file and keeps the OSError a write met: torch's zip writer reports a full disk
    as "enforce fail ... unexpected pos", and the errno (ENOSPC, EDQUOT, EFBIG) is what says what happened."""

    def __init__(self, handle):
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.handle.flush()


def save_atomically(checkpoint: Any, path: str | Path) -> None:
    """``torch.save(checkpoint, path)`` so that ``path`` always holds a whole file: the bytes go to a temporary file in
    the same folder, are flushed and fsynced, and the file is renamed over ``path`` (``os.replace``, atomic on one
    filesystem), then the folder is fsynced. A crash, SIGKILL or full disk at any moment leaves the previous file as it
    was. A write that fails raises the OSError it met (naming ``path``), and the temporary file is removed."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".{path.name}.*.tmp"):  # what a save of this file killed earlier left (never a checkpoint)
        with contextlib.suppress(OSError):
            stale.unlink()
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as file:
            writer = _CountingWriter(file)
            try:
                torch.save(checkpoint, writer)
                file.flush()
                os.fsync(file.fileno())
            except (OSError, RuntimeError) as err:
                failure = writer.error or (err if isinstance(err, OSError) else None)
                if failure is None:
                    raise
                raise OSError(failure.errno, failure.strerror, str(path)) from err
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a power cut once the folder is synced
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, writing local checkpoints with ``save_atomically``.

    Why not Lightning's own: its ``_atomic_save`` writes through an fsspec transaction whose temporary file lies in
    the system's temp folder and is *moved* into place, which is a copy, not a rename, when the run folder is on
    another filesystem (a SIGKILL during it left an unreadable last.ckpt and a 30 MB orphan in /tmp), and it is
    never fsynced. Remote paths (s3://, gs://) keep Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_atomically(checkpoint, str(path).removeprefix("file://"))


def checkpoint_step(path: str | Path) -> Optional[int]:
    """The global step a checkpoint holds (read with its tensors mapped, not loaded), or None if it is unreadable."""
    try:
        return int(read_checkpoint(path, mmap=True).get("global_step", 0))
    except ConfigError:
        return None


def newest_checkpoint(folder: str | Path, exclude: Optional[str | Path] = None) -> Optional[Path]:
    """The most recently written readable ``*.ckpt`` in ``folder`` (``exclude``: a file not to name), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = sorted((p for p in folder.glob("*.ckpt") if exclude is None or p != Path(exclude)),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    return next((p for p in candidates if checkpoint_step(p) is not None), None)
