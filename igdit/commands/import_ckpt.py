"""`igdit import-ckpt`: an official SiT+IG checkpoint (or bare state dict) as an igdit checkpoint.

    igdit import-ckpt --from official-sit 0400000.pt --model SiT-XL/2 --exit 8 --out sit_xl2_ig.ckpt
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import torch
from jsonargparse import ActionConfigFile
from jsonargparse.typing import PositiveInt

from igdit.checkpoints import OFFICIAL_WEIGHTS, import_official_sit
from igdit.config import ConfigError, config_parser

FORMATS = ("official-sit",)


def build_parser():
    parser = config_parser(prog="igdit import-ckpt", description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of these options")
    parser.add_argument("--from", dest="format", type=str, required=True, help="the checkpoint's format: "
                        + ", ".join(FORMATS))
    parser.add_argument("file", type=str, help="the checkpoint to import")
    parser.add_argument("--model", type=str, required=True, help="backbone name, e.g. SiT-XL/2")
    parser.add_argument("--exit", dest="exits", type=Union[PositiveInt, list[PositiveInt]], required=True,
                        help="1-based block of the IG exit head (8), or a list ([4, 8])")
    parser.add_argument("--out", type=str, required=True, help="the Lightning checkpoint to write")
    parser.add_argument("--weights", type=Literal[OFFICIAL_WEIGHTS], default="ema",
                        help="which weights of a training checkpoint")
    parser.add_argument("--input-size", type=Optional[PositiveInt], default=None, help="latent side (default: from the shapes)")
    parser.add_argument("--in-channels", type=Optional[PositiveInt], default=None,
                        help="latent channels (default: from the shapes)")
    parser.add_argument("--num-classes", type=Optional[PositiveInt], default=None, help="classes (default: from the shapes)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def main(argv: Sequence[str]) -> int:
    """`igdit import-ckpt ...`: 0 on success; a bad value raises ConfigError (one line from the dispatcher)."""
    args = build_parser().parse_args(list(argv))
    fmt, source = args.format, args.file
    if fmt not in FORMATS:
        raise ConfigError("--from", fmt, "choose " + ", ".join(repr(f) for f in FORMATS))
    exits = [int(e) for e in ([args.exits] if isinstance(args.exits, int) else args.exits)]
    out = import_official_sit(source, args.model, exits, args.out, input_size=args.input_size,
                              in_channels=args.in_channels, num_classes=args.num_classes, weights=args.weights,
                              overwrite=args.overwrite)
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    backbone, imported = ckpt["hyper_parameters"]["backbone"]["init_args"], ckpt["igdit_import"]
    n_params = sum(v.numel() for v in ckpt["state_dict"].values())  # as the official count: pos_embed included
    print(f"imported {source} ({imported['layout']}, weights {imported['weights']})")
    print(f"  model       {args.model} exits {backbone['exits']} input {backbone['in_channels']}x"
          f"{backbone['input_size']}x{backbone['input_size']} classes {backbone['num_classes']}")
    print(f"  loaded      {len(ckpt['state_dict'])} keys, {n_params:,} parameters")
    print(f"  steps       {ckpt['global_step']} (epoch {ckpt['epoch']})")
    print(f"  written to  {out}  (igdit sample --ckpt {out} ...)")
    return 0
