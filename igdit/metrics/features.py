"""Feature networks behind the Fréchet distance.

Two networks, named honestly in every log line:

* ``inception`` -> metric ``fid``: Inception-v3 pool3 (2048-d) exactly as torchmetrics / torch-fidelity
  define it (the FID-Inception weights ported from TensorFlow). Real runs use it; its numbers are
  comparable with published FID-10k/50k only up to the known protocol differences (see the README).
* ``digits`` -> metric ``fd_digits``: a small CNN trained on the data set itself (its training split, decoded
  from the shards) the first time it is needed, then cached beside the reference statistics under a name that
  hashes the shards. Inception features of 8x8 greyscale digits carry little signal, so the default run
  measures its samples in a feature space that knows digits.

Both take uint8 images (N, C, H, W) in [0, 255] and return (N, num_features) float features, so they
plug into torchmetrics' ``FrechetInceptionDistance(feature=<module>)`` unchanged.
"""
from __future__ import annotations

import os
from pathlib import Path
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn

from igdit.compat import inception_all_features
from igdit.config import ConfigError
from igdit.data.cache import split_images, train_classifier

FEATURE_KINDS = ("digits", "inception")
METRIC_NAMES = {"digits": "fd_digits", "inception": "fid"}
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's release file
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         + INCEPTION_WEIGHTS_FILE)


class DigitsFeatureNet(nn.Module):
    """A small CNN classifier for low-resolution images; its penultimate layer is the feature space.

    forward(images uint8 (N, C, H, W)) -> (N, num_features) features after the last hidden ReLU.
    logits(images) -> (N, num_classes). Images are scaled to [-1, 1] inside, so callers pass what the
    data set stores. The network never leaves eval mode once trained (dropout would make features random).
    """

    def __init__(self, in_channels: int = 1, image_size: int = 8, num_classes: int = 10, num_features: int = 64,
                 width: int = 16):
        super().__init__()
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.num_features, self.width = num_features, width
        half = (image_size + 1) // 2
        # No global pooling: where a stroke is matters for a digit, so the last conv map is flattened.
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(2 * width * half * half, num_features), nn.ReLU(),
        )
        self.head = nn.Linear(num_features, num_classes)

    def config(self) -> dict:
        return {"in_channels": self.in_channels, "image_size": self.image_size, "num_classes": self.num_classes,
                "num_features": self.num_features, "width": self.width}

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (self.in_channels, 3) or \
                tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"expected (N, {self.in_channels}, {self.image_size}, {self.image_size}) images, "
                             f"got {tuple(images.shape)}")
        if images.shape[1] == 3 and self.in_channels == 1:  # ADM .npz stores grey as three equal channels
            images = images[:, :1]
        x = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()
        return x.to(self.head.weight.device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self._prepare(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self._prepare(images)))


def train_digits_feature_net(train_images: torch.Tensor, train_labels: torch.Tensor, val_images: torch.Tensor,
                             val_labels: torch.Tensor, num_classes: int, epochs: int = 40, seed: int = 0,
                             batch_size: int = 128, lr: float = 3e-3,
                             progress: bool = False) -> tuple[DigitsFeatureNet, dict]:
    """Train the domain feature network on uint8 images (N, C, H, W) with labels (N,).

    Small random shifts (one pixel, by padding and cropping) keep it from memorising the 1.6k images.
    Returns (network in eval mode, {"train_accuracy", "val_accuracy", "epochs", ...}); the held-out
    accuracy is stored with the cached network. Deterministic for a fixed seed. ``progress``: a bar over the
    epochs (half a minute on two CPU cores, once per data set).
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = DigitsFeatureNet(in_channels=train_images.shape[1], image_size=train_images.shape[-1],
                               num_classes=num_classes)
    train_classifier(net, train_images.float() / 127.5 - 1.0, train_labels, epochs, seed, batch_size, lr,
                     progress=progress, desc="training the fd_digits feature network (once per data set)")
    with torch.no_grad():
        accuracy = {split: (net.logits(images).argmax(1) == labels).float().mean().item()
                    for split, images, labels in (("train", train_images, train_labels),
                                                  ("val", val_images, val_labels))}
    return net, {"train_accuracy": round(accuracy["train"], 4), "val_accuracy": round(accuracy["val"], 4),
                 "epochs": epochs, "seed": seed}


def save_digits_feature_net(net: DigitsFeatureNet, path: Path, info: dict) -> None:
    """Write the network as plain tensors and containers (loads with torch.load(weights_only=True)); never
    replaces an existing file (another process may have written the same network first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as handle:
        torch.save({"config": net.config(), "state_dict": net.state_dict(), "info": info}, handle)


def load_digits_feature_net(path: str | os.PathLike) -> tuple[DigitsFeatureNet, dict]:
    """A saved domain feature network and its training facts (accuracies, epochs, seed)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    net = DigitsFeatureNet(**saved["config"])
    net.load_state_dict(saved["state_dict"])
    return net.eval().requires_grad_(False), saved["info"]


def digits_feature_net(datamodule, cache_dir: Path, fingerprint: str) -> DigitsFeatureNet:
    """The domain feature network of the shards in ``datamodule``: loaded from ``cache_dir`` when this data set
    (``fingerprint``: a hash of its shards) already has one, else trained on the training split's images and
    measured on the validation split, then cached (``fd_digits-<fingerprint>.pt``). Deterministic, and trained
    on the CPU, so every rank of a multi-GPU run gets the same network."""
    path = Path(cache_dir) / f"fd_digits-{fingerprint[:12]}.pt"
    if not path.is_file():
        (train_x, train_y), (val_x, val_y) = (split_images(datamodule, s) for s in ("train", "val"))
        from lightning_utilities.core.rank_zero import rank_zero_only  # the rank Lightning set, else the launcher's

        net, info = train_digits_feature_net(train_x, train_y, val_x, val_y, datamodule.num_classes,
                                             progress=getattr(rank_zero_only, "rank", 0) == 0)
        try:
            save_digits_feature_net(net, path, info | {"trained_on": "train split", "accuracy_on": "val split"})
        except FileExistsError:  # another rank or run wrote the same network meanwhile
            pass
        except OSError as err:
            warnings.warn(f"could not cache the fd_digits network at {path} ({err}); it will be trained again "
                          "next time", stacklevel=2)
        return net
    return load_digits_feature_net(path)[0]


def inception_weights_candidates(weights_path: Optional[str]) -> list[Path]:
    """Where the FID-Inception weights are looked for: the given path, else torch.hub's cache."""
    if weights_path is not None:
        return [Path(weights_path)]
    return [Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE]


class InceptionFeatures(nn.Module):
    """torchmetrics' Inception-v3 (torch-fidelity's FID port) returning pool3 features (N, 2048).

    One forward also keeps the unbiased logits of the same images for the Inception Score
    (``last_logits``), so IS costs no second Inception pass. Inputs: uint8 (N, 3, H, W); grey (N, 1, H, W)
    is repeated to three channels. ``antialias=False`` resizes like the TF1 code behind the ADM suite.
    """

    num_features = 2048

    def __init__(self, weights_path: Optional[str] = None, allow_download: bool = False,
                 field: str = "inception_weights"):
        super().__init__()
        candidates = inception_weights_candidates(weights_path)
        found = next((p for p in candidates if p.is_file()), None)
        if found is None and not allow_download:
            raise ConfigError(field, weights_path, "FID-Inception weights not found; looked in "
                              + ", ".join(str(p) for p in candidates) + f"; download {INCEPTION_WEIGHTS_URL} "
                              f"to {candidates[-1]} (or pass its path), or allow_download: true")
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ModuleNotFoundError as err:  # pragma: no cover - torch-fidelity is a dependency
            raise ConfigError("feature", "inception", f"needs torch-fidelity ({err})") from None
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=str(found) if found else None, antialias=False)
        self.last_logits: Optional[torch.Tensor] = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        # NoTrainInceptionV3.forward returns only the first requested feature; its underlying pass returns all.
        pool, logits = inception_all_features(self.net, images.to(torch.uint8))
        self.last_logits = logits.reshape(images.shape[0], -1)
        return pool.reshape(images.shape[0], -1)


class LastLogits(nn.Module):
    """The logits ``InceptionFeatures`` computed in its latest forward (the IS metric's feature module)."""

    def __init__(self, source: InceptionFeatures):
        super().__init__()
        self.source = [source]  # a list: not a submodule, so it is not moved or counted twice

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.source[0].last_logits
        if logits is None or logits.shape[0] != images.shape[0]:
            raise RuntimeError("LastLogits needs InceptionFeatures to run on the same images first")
        return logits


def build_feature_net(kind: str, inception_weights: Optional[str] = None, allow_download: bool = False,
                      field: str = "feature", weights_field: str = "inception_weights",
                      digits: Optional[Callable[[], nn.Module]] = None) -> nn.Module:
    """The feature network called ``kind``: "inception", or "digits" (built by ``digits()``, which knows the data)."""
    if kind not in FEATURE_KINDS:
        raise ConfigError(field, kind, "choose one of " + ", ".join(repr(k) for k in FEATURE_KINDS))
    if kind == "digits":
        if digits is None:
            raise ConfigError(field, kind, "needs the data folder (its shards) to train the digits network on")
        return digits()
    return InceptionFeatures(inception_weights, allow_download, weights_field)
