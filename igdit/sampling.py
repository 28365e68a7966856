"""`igdit sample`: images from a checkpoint with any sampler and guidance, as an ADM-suite .npz and a grid.

    igdit sample --ckpt model.ckpt [--config experiment.yaml] --sampler sde --steps 250 --ig.scale 1.4 --ig.interval [0,1] \\
        --cfg.scale 1.35 --cfg.interval [0,0.7] --num 50000 --labels random --out samples/

The checkpoint's `state_dict` holds the EMA weights (Lightning's EMAWeightAveraging puts them there) and
its hyper-parameters rebuild the model, so no experiment YAML is needed. Every sample i draws its noise
from its own generator seeded with (seed, i), edm2's practice: an image does not depend on the batch
size or on how many ranks generate. Under torchrun each rank generates the indices i = rank (mod world),
writes its part, and rank 0 merges the parts into `samples.npz` (`arr_0`: N x H x W x 3 uint8, in index
order, the layout the ADM evaluation suite reads; `labels`: N class labels).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from igdit.config import ConfigError, check_choice, check_interval, check_number
from igdit.guidance import Denoiser, GuidanceRule
from igdit.samplers import SAMPLERS, run_sampler

LABEL_MODES = ("random", "balanced")


def class_labels(num: int, num_classes: int, mode: str, seed: int) -> torch.Tensor:
    """(num,) labels: uniformly random, or class-balanced (exactly num / num_classes per class, shuffled)."""
    generator = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.randint(0, num_classes, (num,), generator=generator)
    if num % num_classes:
        raise ConfigError("--num", num, f"--labels balanced needs a multiple of the {num_classes} classes")
    labels = torch.arange(num_classes).repeat_interleave(num // num_classes)
    return labels[torch.randperm(num, generator=generator)]


class PerSampleNoise:
    """Gaussian noise from one generator per sample, seeded with (seed, sample index).

    Each call returns the next (n, *shape) draw: the first is the starting noise, later ones an SDE's
    step noise, so a sample's whole trajectory depends only on its own index.
    """

    def __init__(self, indices: list[int], seed: int, shape: tuple[int, ...], device="cpu"):
        self.generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in indices]
        self.shape, self.device = shape, device

    def __call__(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device)


def to_nhwc_rgb(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) uint8 with C in {1, 3} -> (N, H, W, 3) uint8 numpy (grey is repeated)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.permute(0, 2, 3, 1).contiguous().numpy()


@torch.no_grad()
def image_batches(module, denoiser: Denoiser, sampler: str, steps: int, indices: list[int], labels: torch.Tensor,
                  seed: int, batch_size: int, progress: bool = True) -> Iterator[tuple[torch.Tensor, int]]:
    """Generate the samples `indices` (labels: theirs, (len(indices),)) batch by batch.

    Yields (uint8 images (B, C, H, W) on the model's device, decoded with the module's shard metadata, NFE
    per sample of that batch). Only one batch is held at a time, so callers can stream thousands of images.
    """
    from tqdm import tqdm

    from igdit.data.encoders import decode_latents
    from igdit.images import to_uint8

    device = next(module.backbone.parameters()).device
    dtype = next(module.backbone.parameters()).dtype
    starts = range(0, len(indices), batch_size)
    for start in tqdm(starts, desc="sampling", unit="batch", disable=not progress):
        batch_indices = indices[start:start + batch_size]
        noise = PerSampleNoise(batch_indices, seed, module.latent_shape, device)
        x1 = noise()
        x0, nfe = run_sampler(sampler, denoiser, module.transport, x1, labels[start:start + batch_size].to(device),
                              steps, model_dtype=dtype, step_noise=noise)
        yield to_uint8(decode_latents(x0.float(), module.data_meta)), nfe


def generate(module, denoiser: Denoiser, sampler: str, steps: int, indices: list[int], labels: torch.Tensor,
             seed: int, batch_size: int, progress: bool = True) -> tuple[np.ndarray, int]:
    """Generate the samples `indices` (labels: the labels of those indices). Returns (N x H x W x 3 uint8, NFE
    of one batch)."""
    chunks, nfe = [], 0
    for images, nfe in image_batches(module, denoiser, sampler, steps, indices, labels, seed, batch_size, progress):
        chunks.append(to_nhwc_rgb(images.cpu()))
    return np.concatenate(chunks), nfe


def load_module(path: str, field: str = "--ckpt", device: str = "cpu"):
    """An IGDiTModule from an igdit checkpoint; its state_dict (the EMA weights) is loaded."""
    from igdit.module import IGDiTModule

    if not Path(path).is_file():
        raise ConfigError(field, path, "is not a file; pass an igdit checkpoint (.ckpt), e.g. runs/<exp>/<run>/checkpoints/last.ckpt")
    module = IGDiTModule.load_from_checkpoint(path, map_location=device)
    return module.eval().to(device)


def check_config_matches(config: str, hparams) -> None:
    """One-line ConfigError when the experiment's model section disagrees with the checkpoint's model."""
    import yaml

    if not Path(config).is_file():
        raise ConfigError("--config", config, "is not a file; pass the experiment YAML, e.g. experiments/default.yaml")
    model = (yaml.safe_load(Path(config).read_text()) or {}).get("model") or {}
    for key in ("name", "exits", "input_size", "in_channels", "num_classes"):
        if key in model and model[key] != hparams.get(key):
            raise ConfigError(f"--config model.{key}", model[key], f"the checkpoint was trained with "
                              f"{key} {hparams.get(key)!r}; pass the experiment it was trained with")


def _interval(text: str) -> tuple[float, float]:
    try:
        return tuple(float(v) for v in text.strip().strip("[]()").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected [low,high], got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="igdit sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="igdit checkpoint (EMA weights in its state_dict)")
    p.add_argument("--config", default=None, help="the experiment YAML the checkpoint was trained with (optional: "
                   "the checkpoint carries its model; given, its model section must agree with the checkpoint)")
    p.add_argument("--sampler", default="sde", help="sde (Euler-Maruyama, the paper's), euler or heun (ODE)")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--ig.scale", dest="ig_scale", type=float, default=1.0, help="Internal Guidance w (1 = off)")
    p.add_argument("--ig.interval", dest="ig_interval", type=_interval, default=(0.0, 1.0), help="[low,high] in t (1 = noise)")
    p.add_argument("--ig.exit", dest="ig_exit", type=int, default=None, help="exit block used by IG (default: the first)")
    p.add_argument("--cfg.scale", dest="cfg_scale", type=float, default=1.0)
    p.add_argument("--cfg.interval", dest="cfg_interval", type=_interval, default=(0.0, 1.0))
    p.add_argument("--ag.ckpt", dest="ag_ckpt", default=None, help="weaker igdit checkpoint for Autoguidance")
    p.add_argument("--ag.scale", dest="ag_scale", type=float, default=1.0)
    p.add_argument("--ag.interval", dest="ag_interval", type=_interval, default=(0.0, 1.0))
    p.add_argument("--num", type=int, default=100, help="number of samples (the paper: 50000)")
    p.add_argument("--batch-size", type=int, default=100, help="samples per batch and rank")
    p.add_argument("--labels", default="random", help="random or balanced (the 1.19 vs 1.07 FID of the paper)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace samples.npz/samples.png in --out")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        # Everything is checked before a single sample is drawn.
        check_choice("--sampler", args.sampler, SAMPLERS)
        check_choice("--labels", args.labels, LABEL_MODES)
        check_number("--steps", args.steps, low=2 if args.sampler == "sde" else 1, integer=True)
        check_number("--num", args.num, low=1, integer=True)
        check_number("--batch-size", args.batch_size, low=1, integer=True)
        out = Path(args.out)
        existing = [p for p in (out / "samples.npz", out / "samples.png") if p.exists()]
        if existing and not args.overwrite:
            raise ConfigError("--out", str(out), f"already holds {existing[0].name}; pass --overwrite or another folder")
        ig = GuidanceRule(args.ig_scale, check_interval("--ig.interval", args.ig_interval))
        cfg = GuidanceRule(args.cfg_scale, check_interval("--cfg.interval", args.cfg_interval))
        ag = GuidanceRule(args.ag_scale, check_interval("--ag.interval", args.ag_interval))
        if world > 1:
            torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
            if args.device.startswith("cuda"):
                args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        module = load_module(args.ckpt, device=args.device)
        if args.config is not None:
            check_config_matches(args.config, module.hparams)
        if module.data_meta is None:
            raise ConfigError("--ckpt", args.ckpt, "carries no shard meta.json (encoder and normaliser), so its "
                              "latents cannot be decoded to images; train it with igdit or import it with its data's meta")
        guide = load_module(args.ag_ckpt, "--ag.ckpt", args.device).backbone if args.ag_ckpt else None
        denoiser = Denoiser(module.backbone, ig=ig, cfg=cfg, autoguidance=ag, guide=guide, ig_exit=args.ig_exit)
        labels = class_labels(args.num, module.num_classes, args.labels, args.seed)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    indices = list(range(rank, args.num, world))
    start = time.perf_counter()
    images, nfe = generate(module, denoiser, args.sampler, args.steps, indices, labels[indices], args.seed,
                           args.batch_size, progress=rank == 0)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    part = out / f"part-{rank:05d}-of-{world:05d}.npz"
    np.savez(part, arr_0=images, indices=np.asarray(indices))
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        merged = merge_parts(out, world, args.num)
        np.savez(out / "samples.npz", arr_0=merged, labels=labels.numpy())
        grid_path = save_sample_grid(merged, out / "samples.png", overwrite=args.overwrite)
        batches = -(-len(indices) // args.batch_size)
        print(f"wrote {out / 'samples.npz'} (arr_0 {tuple(merged.shape)} uint8) and {grid_path}")
        print(f"sampler {args.sampler}, {args.steps} steps: NFE {nfe} per sample; network forward passes "
              f"{denoiser.network_passes // max(batches, 1)} per batch, relative cost "
              f"{denoiser.network_rows / max(nfe * len(indices), 1):.3f} x an unguided run; {seconds:.1f} s on rank 0")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def merge_parts(out: Path, world: int, num: int) -> np.ndarray:
    """Merge part-*-of-<world>.npz into one (num, H, W, 3) array in sample-index order, then remove the parts."""
    parts = [out / f"part-{r:05d}-of-{world:05d}.npz" for r in range(world)]
    loaded = [np.load(p) for p in parts]
    indices = np.concatenate([p["indices"] for p in loaded])
    images = np.concatenate([p["arr_0"] for p in loaded])
    if sorted(indices.tolist()) != list(range(num)):
        raise RuntimeError(f"the parts in {out} do not cover samples 0..{num - 1} exactly once")
    merged = np.empty_like(images)
    merged[indices] = images
    for p in parts:  # this run's own temporary files
        p.unlink()
    return merged


def save_sample_grid(images: np.ndarray, path: Path, overwrite: bool, columns: int = 10) -> Path:
    """The first rows x `columns` samples as a PNG."""
    from igdit.images import image_grid

    columns = min(columns, len(images))
    rows = min(10, len(images) // columns)
    block = torch.from_numpy(images[: rows * columns]).permute(0, 3, 1, 2).reshape(rows, columns, 3, *images.shape[1:3])
    upscale = max(1, 64 // images.shape[1])
    grid = image_grid([block], upscale=upscale)
    if overwrite and path.exists():
        path.unlink()
    grid.save(path)
    return path
