"""`igdit data build <source> <out_dir>`: encode a source into WebDataset shards of latents."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal, Optional

from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt

from igdit.commands.common import add_config_option, refuse_misplaced_files, underscore_options
from igdit.config import config_parser
from igdit.data.encoders import ENCODERS, LATENT_MODES, hf_cache_dir
from igdit.data.shards import (DEFAULT_MOMENTS_DTYPE, DEFAULT_SAMPLES_PER_SHARD, META_FILE, MOMENTS_DTYPES, NORMALIZERS,
                                build_dataset, load_meta, verify_shards)
from igdit.data.sources import SOURCES


def _parser():
    parser = config_parser(prog="igdit data", description="Build the latent shards igdit trains on.")
    commands = parser.add_subcommands(dest="command", required=True)
    build = config_parser(
        description="Encode a source into <out_dir>/train-*.tar, val-*.tar and meta.json (written last).\n"
                    "A finished out_dir (meta.json) is refused; an unfinished one only with --resume. Nothing is deleted.\n"
                    "Under torchrun (torchrun --nproc_per_node 8 -m igdit.cli data build ...) every rank encodes its\n"
                    "share of the shards on its own GPU; rank 0 writes meta.json.\n\n"
                    "  igdit data build digits data/digits\n"
                    "  igdit data build imagefolder:/datasets/imagenet/train data/imagenet256 --encoder sd-vae-ft-ema \\\n"
                    "      --resolution 256 --flip --samples_per_shard 2500 --val_fraction 0.001 --latent posterior")
    add_config_option(build)
    build.add_argument("source", type=str, help=f"image source: {', '.join(SOURCES)} (imagefolder:<dir>, one sub-folder per class)")
    build.add_argument("out_dir", type=str, help="folder for the shards, e.g. data/digits")
    build.add_argument("--encoder", type=str, default="identity",
                       help=f"latent encoder: {', '.join(ENCODERS)} or diffusers:<folder or hub id> (default identity)")
    build.add_argument("--vae_path", type=Optional[str], default=None,
                       help="local folder with the VAE weights (save_pretrained layout); default: the Hugging Face "
                            f"cache ({hf_cache_dir()}); nothing is downloaded")
    build.add_argument("--latent", type=Optional[str], default=None,
                       help=f"VAEs, one of {', '.join(LATENT_MODES)}: store a posterior sample (default; seeded "
                            "per image), the posterior mean, or the posterior's mean and std (--moments_dtype) so "
                            "that training draws a fresh latent every time it reads a sample")
    build.add_argument("--moments_dtype", type=Optional[Literal[MOMENTS_DTYPES]], default=None,
                       help=f"--latent posterior: dtype of the stored mean and std, one of {', '.join(MOMENTS_DTYPES)} "
                            f"(default {DEFAULT_MOMENTS_DTYPE}: float16 rounds the mean by up to 2^-11 of its size, "
                            "which on unit-scale latents is up to 0.98 of a posterior std of 1e-3 and 0.098 of one of "
                            "1e-2 (BENCHMARKS.md), and SD-VAE's std cannot be measured without its weights; float32 "
                            "is exact and takes 1.8x the bytes). Other latents are stored in float16")
    build.add_argument("--normalizer", type=str, default="encoder",
                       help=f"one of {', '.join(NORMALIZERS)}: the encoder's own scaling (0.18215 for SD-VAE; "
                            "default) or per-channel mean/std of --stats_images training latents")
    build.add_argument("--stats_images", type=PositiveInt, default=10_000,
                       help="images the channel statistics are measured on (default 10000)")
    build.add_argument("--resolution", type=Optional[PositiveInt], default=None,
                       help="imagefolder: ADM centre-crop size (required, 256 for ImageNet 256x256); digits: upsample "
                            "to NxN (bilinear) before encoding; default: keep the source size")
    build.add_argument("--flip", action="store_true",
                       help="also write a horizontally flipped copy of every training image (key <row>-flip)")
    build.add_argument("--samples_per_shard", type=Optional[PositiveInt], default=None,
                       help=f"samples per .tar shard (default {DEFAULT_SAMPLES_PER_SHARD}); see the shard-count rule in "
                            "the README: several shards per GPU x data worker")
    build.add_argument("--shard_size_mb", type=Optional[PositiveFloat], default=None,
                       help="shard size in MiB instead of --samples_per_shard (4x32x32 latents: 10 KiB per sample; "
                            "posteriors: 19 KiB in float16, 35 KiB in float32)")
    build.add_argument("--val_fraction", type=float, default=0.1,
                       help="share of each class held out for validation (default 0.1)")
    build.add_argument("--seed", type=NonNegativeInt, default=0, help="seed of the train/val split and posterior samples (default 0)")
    build.add_argument("--resume", action="store_true",
                       help="continue an unfinished build in out_dir (same arguments): finished shards are kept, "
                            "a half-written one is redone")
    build.add_argument("--batch_size", type=PositiveInt, default=64, help="images per encoder call (default 64)")
    build.add_argument("--workers", type=Optional[NonNegativeInt], default=None,
                       help="processes decoding image files (default min(8, cores) for files, 0 for digits)")
    build.add_argument("--device", type=Optional[str], default=None, help="encoder device (default cuda:LOCAL_RANK if available, else cpu)")
    build.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bar")
    commands.add_subcommand("build", build, help="encode a source into train/val WebDataset shards plus meta.json")
    verify = config_parser(description="Check a built folder: every shard meta.json lists is there and holds the "
                                       "bytes the build wrote (sha256).")
    add_config_option(verify)
    verify.add_argument("root", type=str, help="the built folder, e.g. data/digits")
    commands.add_subcommand("verify", verify, help="check every shard against the checksums in meta.json")
    return parser


def _summary(meta: dict, out_dir: str, seconds: float) -> str:
    c, h, w = meta["latent_shape"]
    norm = meta["normalizer"]
    lines = [f"built {meta['source']} -> {out_dir} in {seconds:.1f} s"]
    for split in ("train", "val"):
        n, k = meta["num_samples"][split], meta["num_shards"][split]
        lines.append(f"  {split:<5} {n:>7} samples in {k} shard(s)  {split}-{0:06d}.tar .. {split}-{k - 1:06d}.tar")
    size = f"{meta['image_shape'][1]}x{meta['image_shape'][2]}" + (" (upsampled)" if meta["upsampled"] else "")
    flip = ", training images also mirrored" if meta.get("flip") else ""
    stored = "posterior mean and std" if meta.get("latent_format") == "posterior" else "latents"
    lines.append(f"  images {size}{flip}; {stored} {c}x{h}x{w} {meta['dtype']}, encoder {meta['encoder']['name']}, "
                 f"{meta['num_classes']} classes")
    lines.append(f"  normalizer shift {norm['shift']} scale {norm['scale']}")
    skipped = meta.get("skipped_images", {}).get("count", 0)
    if skipped:
        first = meta["skipped_images"]["first"][0]
        lines.append(f"  skipped {skipped} unreadable image(s), e.g. {first['image']} ({first['error']}); "
                     "all are listed in meta.json")
    lines.append(f"  meta   {Path(out_dir) / META_FILE}")
    backbone = "--model.backbone.init_args"
    lines.append(f"train on it with --data.root {out_dir} {backbone}.input_size {h} {backbone}.in_channels {c} "
                 f"{backbone}.num_classes {meta['num_classes']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Run `igdit data ...`; returns the exit code (bad values raise ConfigError: the dispatcher prints one line)."""
    parser = _parser()
    argv = underscore_options(list(argv), parser, "data")
    refuse_misplaced_files(argv, "data")
    args = parser.parse_args(argv)
    if args.command == "verify":
        problems = verify_shards(args.verify.root)
        for problem in problems:
            print(f"{args.verify.root}/{problem}")
        meta = load_meta(args.verify.root)
        total = sum(meta["num_shards"].values())
        extra = sum("not listed in meta.json" in p for p in problems)
        print(f"{'FAILED' if problems else 'ok'}: {total - len(problems) + extra} of {total} shards as built"
              + (f"; {extra} shard file(s) meta.json does not list" if extra else ""))
        return 1 if problems else 0
    if args.command == "build":
        a = args.build
        start = time.perf_counter()
        meta = build_dataset(a.source, a.out_dir, encoder=a.encoder, resolution=a.resolution,
                             samples_per_shard=a.samples_per_shard, val_fraction=a.val_fraction, seed=a.seed,
                             progress=a.progress, shard_size_mb=a.shard_size_mb, flip=a.flip,
                             normalizer=a.normalizer, stats_images=a.stats_images, vae_path=a.vae_path,
                             latent=a.latent, resume=a.resume, batch_size=a.batch_size, workers=a.workers,
                             device=a.device, moments_dtype=a.moments_dtype)
        if int(os.environ.get("RANK", 0)) == 0:
            print(_summary(meta, a.out_dir, time.perf_counter() - start))
    return 0
