"""Frozen image encoders whose patch features a representation-alignment term (REPA) regresses onto.

An encoder is configured by ``class_path`` under the term (``model.terms.repa.init_args.encoder``). It says
what it produces before anything is loaded (``num_features`` F and its token grid ``grid_size`` g, so the term
builds its projector and checks the grid at construction), loads its network once at fit start
(``load``: from disk, or trained once on the run's own data and cached beside the shards) into a ``Frozen``
box, and maps clean images to patch features: ``features(images (N, C, H, W) uint8 or float in [-1, 1]) ->
(N, g*g, F)``, tokens in row-major order like the backbone's patches.

* ``DINOv2Encoder``: DINOv2 ViT-B/14 through timm (REPA's encoder): ``x_norm_patchtokens`` of the image
  scaled to [0, 1], normalised with the ImageNet mean/std and resized bicubically to 224 (16 x 16 tokens, the
  grid of SiT/2 on 256-pixel images). Weights come from a given file or the torch.hub / Hugging Face caches
  only; nothing is ever downloaded.
* ``DigitsPatchEncoder``: the small-data stand-in, a convolutional network trained once on the training split
  of the run's shards (seed 1) and cached as ``<root>/fid_refs/repa_digits-<data hash>-<settings>.pt``. It is
  deliberately not the fd_digits metric network (aligning to the metric's own features would game the metric):
  see its docstring for how the two differ.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from jsonargparse.typing import PositiveInt

from igdit.config import ConfigError
from igdit.data.cache import data_fingerprint, reference_dir, split_images, train_classifier
from igdit.objectives.base import Frozen, file_digest

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_unit_interval(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) uint8 in [0, 255] or float in [-1, 1] -> float32 in [0, 1] (REPA's images / 255)."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else (images.float() + 1.0) / 2.0


class PatchEncoder:
    """A frozen network mapping clean images to a grid of patch features (see the module docstring).

    Subclasses set ``num_features`` and ``grid_size`` in their constructor, load their network in ``load``
    (returning the ``Frozen`` box, also kept as ``self.frozen``) and compute features in ``encode``.
    The object is not an ``nn.Module``: a term holding it keeps the network out of the optimiser, the EMA copy
    and checkpoints.
    """

    num_features: int
    grid_size: int

    def __init__(self):
        self.frozen: Optional[Frozen] = None

    def load(self, field: str, datamodule=None) -> Frozen:
        """Load (or train once and cache) the network; ConfigError on ``field`` when it cannot be found."""
        raise NotImplementedError

    def encode(self, net: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images on the network's device -> (N, grid_size ** 2, num_features)."""
        raise NotImplementedError

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) uint8 or float in [-1, 1] -> (N, T, F) float32 patch features (no gradient)."""
        if self.frozen is None:
            raise RuntimeError(f"{type(self).__name__}.load() must run before features() (the term's setup does)")
        net = self.frozen.get(images.device)
        return self.encode(net, images).float()


# ---- DINOv2 through timm ---------------------------------------------------------------------------------
class DINOv2Encoder(PatchEncoder):
    """DINOv2 patch tokens (REPA: ViT-B/14, ``x_norm_patchtokens``, 768 features on 16 x 16 tokens at 224).

    model: a timm DINOv2 architecture (``vit_base_patch14_dinov2.lvd142m`` = DINOv2-B/14).
    weights: a checkpoint file (the official ``dinov2_vitb14_pretrain.pth`` or timm's ``model.safetensors``);
        default: look in torch.hub's cache (``<hub dir>/checkpoints/<the official file name>``, where
        ``torch.hub.load('facebookresearch/dinov2', 'dinov2_vitb14')`` stores it) and then in the Hugging Face
        cache (timm's hub copy). A missing file is a one-line error naming every place looked in.
    resolution: images are resized (bicubic) to this side; tokens per side = resolution / 14.
    model_args: architecture overrides passed to ``timm.create_model`` (small test models).
    """

    def __init__(self, model: str = "vit_base_patch14_dinov2.lvd142m", weights: Optional[str] = None,
                 resolution: PositiveInt = 224, model_args: Optional[dict] = None):
        super().__init__()
        import timm

        self.model_name, self.weights, self.resolution = model, weights, int(resolution)
        self.model_args = dict(model_args or {})
        try:
            with torch.device("meta"):  # the architecture only: F and the grid, before any weights are read
                skeleton = timm.create_model(model, pretrained=False, num_classes=0, img_size=self.resolution,
                                             **self.model_args)
        except (RuntimeError, TypeError, ValueError) as err:
            reason = " ".join(str(err).split())
            raise ConfigError("DINOv2Encoder.model", model,
                              f"is not a timm model these arguments build ({reason})") from None
        self.num_features = int(skeleton.num_features)
        grid = skeleton.patch_embed.grid_size
        if grid[0] != grid[1]:
            raise ConfigError("DINOv2Encoder.resolution", resolution, f"gives a non-square token grid {tuple(grid)}")
        self.grid_size = int(grid[0])
        self.pretrained_cfg = dict(skeleton.pretrained_cfg)
        self.mean = tuple(self.pretrained_cfg.get("mean", IMAGENET_MEAN))
        self.std = tuple(self.pretrained_cfg.get("std", IMAGENET_STD))

    def candidates(self) -> list[Path]:
        """Where the weights are looked for, in order: the given file; else torch.hub's cache, then the HF cache."""
        if self.weights is not None:
            return [Path(self.weights).expanduser()]
        places = []
        url = self.pretrained_cfg.get("url")
        if url:
            places.append(Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name)
        hub_id = self.pretrained_cfg.get("hf_hub_id")
        if hub_id:
            from huggingface_hub import constants, try_to_load_from_cache

            cached = try_to_load_from_cache(hub_id, "model.safetensors")  # a path, or None/a marker: never a download
            places.append(Path(cached) if isinstance(cached, str) else
                          Path(constants.HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}" / "snapshots" /
                          "<revision>" / "model.safetensors")
        return places

    def load(self, field: str, datamodule=None) -> Frozen:
        import timm

        places = self.candidates()
        found = next((p for p in places if p.is_file()), None)
        if found is None:
            url, hub_id = self.pretrained_cfg.get("url"), self.pretrained_cfg.get("hf_hub_id")
            fetch = [f"download {url} to {places[0]}"] if url else []
            fetch += [f"run `hf download {hub_id} model.safetensors`"] if hub_id else []
            hint = "give the path of an existing file" if self.weights is not None else \
                " or ".join(fetch + ["set weights to a local file"])
            raise ConfigError(f"{field}.init_args.weights", self.weights, f"{self.model_name} weights not found "
                              "(nothing is downloaded); looked in " + ", ".join(map(str, places)) + f"; {hint}")
        # timm reads the file (official DINOv2 or timm layout), converts its keys and resamples the position
        # embedding to this resolution's grid; pretrained_cfg_overlay's file wins over every remote source.
        net = timm.create_model(self.model_name, pretrained=True, pretrained_cfg_overlay={"file": str(found)},
                                num_classes=0, img_size=self.resolution, **self.model_args)
        self.frozen = Frozen(net, str(found), file_digest(found))
        return self.frozen

    def encode(self, net: nn.Module, images: torch.Tensor) -> torch.Tensor:
        x = to_unit_interval(images)
        if x.shape[1] == 1:  # grey images: three equal channels, as DINOv2 expects RGB
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            # REPA: F.interpolate(..., 224, mode="bicubic") after the normalisation, no antialiasing
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic")
        tokens = net.forward_features(x.to(next(net.parameters()).dtype))  # after the final norm
        return tokens[:, net.num_prefix_tokens:]  # drop the class (and register) tokens: x_norm_patchtokens


# ---- the digits stand-in ---------------------------------------------------------------------------------
class DigitsTokenNet(nn.Module):
    """Small CNN whose last convolutional map is a grid of patch tokens; trained as a classifier.

    body: conv3x3(C->w) SiLU conv3x3(w->w) SiLU avgpool(downsample) conv3x3(w->2w) SiLU: (N, 2w, H/s, W/s).
    head: global average pool -> Linear(2w, classes); used only to train the body.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 8, num_classes: int = 10, width: int = 32,
                 downsample: int = 2):
        super().__init__()
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.width, self.downsample = width, downsample
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(downsample),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    def config(self) -> dict:
        return {"in_channels": self.in_channels, "image_size": self.image_size, "num_classes": self.num_classes,
                "width": self.width, "downsample": self.downsample}

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [-1, 1] images -> float [-1, 1] on the network's device (three equal channels -> one)."""
        if images.shape[1] == 3 and self.in_channels == 1:
            images = images[:, :1]
        x = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()
        return x.to(self.head[-1].weight.device)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.prepare(images)))

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, (H/s) * (W/s), 2w) patch tokens, row-major."""
        return self.body(self.prepare(images)).flatten(2).transpose(1, 2)


class DigitsPatchEncoder(PatchEncoder):
    """REPA's external encoder for the small default data: ``DigitsTokenNet`` trained on the run's own data.

    Trained on the CPU the first time a run needs it, on the training split's images decoded from the shards
    (seed ``seed``, ``epochs`` epochs), its validation-split accuracy recorded with it, then cached beside the
    shards under a name that hashes the shards and these settings; every rank and later run loads that file.
    Features: the last convolutional map as (image_size / downsample)^2 tokens of 2 * width features (16 tokens
    x 64 on 8x8 digits, the 4 x 4 grid of SiT-T/2).

    How it differs from the fd_digits metric network (igdit.metrics.features.DigitsFeatureNet): three 3x3
    convolutions of width 32/32/64 with SiLU and an average-pool downsampling, where the metric has two of width
    16/32 with ReLU and a strided convolution; its features are per-position conv tokens read before any fully
    connected layer, where the metric's are one 64-d vector after a fully connected layer on the flattened map;
    its classifier pools globally, the metric's is fully connected; and it is trained from another seed (1,
    the metric 0). Aligning to the metric's own features would make fd_digits reward the alignment itself.

    image_size: side of the decoded images (checked against the data at fit start); width, downsample: the
    network's shape; seed, epochs: its training.
    """

    def __init__(self, image_size: PositiveInt = 8, width: PositiveInt = 32, downsample: PositiveInt = 2,
                 seed: int = 1, epochs: PositiveInt = 20):
        super().__init__()
        if image_size % downsample:
            raise ConfigError("DigitsPatchEncoder.downsample", downsample, f"must divide image_size {image_size}")
        self.image_size, self.width, self.downsample = int(image_size), int(width), int(downsample)
        self.seed, self.epochs = int(seed), int(epochs)
        self.num_features = 2 * self.width
        self.grid_size = self.image_size // self.downsample
        self.info: dict = {}

    def cache_path(self, datamodule) -> Path:
        settings = f"w{self.width}-s{self.downsample}-seed{self.seed}-e{self.epochs}"
        return reference_dir(datamodule) / f"repa_digits-{data_fingerprint(datamodule)[:12]}-{settings}.pt"

    def load(self, field: str, datamodule=None) -> Frozen:
        if datamodule is None or not hasattr(datamodule, "latent_batches"):
            raise ConfigError(field, type(self).__name__, "is trained on the run's data: it needs the shards "
                                                          "(run it under `igdit fit` with a data section)")
        path = self.cache_path(datamodule)
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            net = DigitsTokenNet(**saved["config"])
            net.load_state_dict(saved["state_dict"])
            net.eval().requires_grad_(False)
            self.info = saved["info"]
        else:
            net = self._train(field, datamodule)
            path = self._cache(net, path)
        if net.image_size != self.image_size:
            raise ConfigError(f"{field}.init_args.image_size", self.image_size,
                              f"the shards decode to {net.image_size}x{net.image_size} images")
        digest = file_digest(path) if path.is_file() else _state_digest(net)
        self.frozen = Frozen(net, str(path) if path.is_file() else "trained in memory (not cached)", digest)
        return self.frozen

    def _train(self, field: str, datamodule) -> DigitsTokenNet:
        (train_x, train_y), (val_x, val_y) = (split_images(datamodule, s) for s in ("train", "val"))
        if train_x.shape[-1] != self.image_size or train_x.shape[-2] != self.image_size:
            raise ConfigError(f"{field}.init_args.image_size", self.image_size,
                              f"the shards decode to {train_x.shape[-2]}x{train_x.shape[-1]} images")
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            net = DigitsTokenNet(train_x.shape[1], self.image_size, datamodule.num_classes, self.width, self.downsample)
        # the one-cycle schedule's rate and batch are this encoder's (the metric network trains at 3e-3, batch 128)
        train_classifier(net, net.prepare(train_x), train_y, self.epochs, self.seed, batch_size=64, lr=1e-2)
        with torch.no_grad():
            accuracy = {split: round((net.logits(x).argmax(1) == y).float().mean().item(), 4)
                        for split, x, y in (("train", train_x, train_y), ("val", val_x, val_y))}
        self.info = {"train_accuracy": accuracy["train"], "val_accuracy": accuracy["val"], "epochs": self.epochs,
                     "seed": self.seed, "trained_on": "train split", "accuracy_on": "val split"}
        return net

    def _cache(self, net: DigitsTokenNet, path: Path) -> Path:
        """Write the network once (plain tensors; never replacing a file another rank or run wrote first)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "xb") as handle:
                torch.save({"config": net.config(), "state_dict": net.state_dict(), "info": self.info}, handle)
        except FileExistsError:
            pass
        except OSError as err:
            warnings.warn(f"could not cache the REPA digits encoder at {path} ({err}); it will be trained again "
                          "next time", stacklevel=2)
        return path

    def encode(self, net: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return net.tokens(images)


def _state_digest(net: nn.Module) -> str:
    digest = hashlib.sha256()
    for tensor in net.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
