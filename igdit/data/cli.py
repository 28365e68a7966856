"""`igdit data build <source> <out_dir>`: encode a source into WebDataset shards of latents."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from igdit.config import ConfigError
from igdit.data.encoders import ENCODERS
from igdit.data.shards import META_FILE, build_dataset
from igdit.data.sources import SOURCES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="igdit data", description="Build the latent shards igdit trains on.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser(
        "build", help="encode a source into train/val WebDataset shards plus meta.json",
        description="Encode a source into <out_dir>/train-*.tar, val-*.tar and meta.json (written last). "
                    "An out_dir that already holds shards or meta.json is refused; nothing is deleted.")
    build.add_argument("source", help=f"image source: {', '.join(SOURCES)} (or name:arg for sources that take one)")
    build.add_argument("out_dir", help="folder for the shards, e.g. data/digits")
    build.add_argument("--encoder", default="identity", help=f"latent encoder: {', '.join(ENCODERS)} (default identity)")
    build.add_argument("--resolution", type=int, default=None,
                       help="upsample images to NxN (bilinear) before encoding; default: keep the source size")
    build.add_argument("--samples-per-shard", type=int, default=100, help="samples per .tar shard (default 100)")
    build.add_argument("--val-fraction", type=float, default=0.1,
                       help="share of each class held out for validation (default 0.1)")
    build.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    build.add_argument("--feature-net", action=argparse.BooleanOptionalAction, default=None,
                       help="train the small classifier whose features give the fd_digits metric, beside the "
                            "shards (default: on for digits)")
    return parser


def _summary(meta: dict, out_dir: str, seconds: float) -> str:
    c, h, w = meta["latent_shape"]
    norm = meta["normalizer"]
    lines = [f"built {meta['source']} -> {out_dir} in {seconds:.1f} s"]
    for split in ("train", "val"):
        n, k = meta["num_samples"][split], meta["num_shards"][split]
        lines.append(f"  {split:<5} {n:>7} samples in {k} shard(s)  {split}-{0:06d}.tar .. {split}-{k - 1:06d}.tar")
    size = f"{meta['image_shape'][1]}x{meta['image_shape'][2]}" + (" (upsampled)" if meta["upsampled"] else "")
    lines.append(f"  images {size}; latents {c}x{h}x{w} {meta['dtype']}, encoder {meta['encoder']['name']}, "
                 f"{meta['num_classes']} classes")
    lines.append(f"  normalizer shift {norm['shift']} scale {norm['scale']}")
    if meta.get("feature_net"):
        net = meta["feature_net"]
        lines.append(f"  fd_digits feature network {Path(out_dir) / net['file']}: held-out accuracy "
                     f"{net['val_accuracy']:.3f} ({net['num_features']} features)")
    lines.append(f"  meta   {Path(out_dir) / META_FILE}")
    lines.append(f"train on it with --data.root {out_dir} (model.input_size {h}, model.in_channels {c}, "
                 f"model.num_classes {meta['num_classes']})")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Run `igdit data ...`; returns the exit code (2 with one `error:` line on a bad value)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            start = time.perf_counter()
            meta = build_dataset(args.source, args.out_dir, encoder=args.encoder, resolution=args.resolution,
                                 samples_per_shard=args.samples_per_shard, val_fraction=args.val_fraction,
                                 seed=args.seed, feature_net=args.feature_net)
            print(_summary(meta, args.out_dir, time.perf_counter() - start))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
