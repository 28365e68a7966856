"""`igdit import-ckpt`: an official SiT+IG or LightningDiT+IG checkpoint (or bare state dict) as an igdit
checkpoint that `igdit sample` and `igdit eval` use like a trained one.

    igdit import-ckpt --from official-sit SiT-XL-2-IG.pt --vae sd-vae-ft-ema --out sit_xl2_ig.ckpt
    igdit import-ckpt --from official-lightningdit ldit-xl1-ig.pt --vae vavae-f16d32:<checkpoint> \\
        --latent_stats latents_stats.pt --out ldit_ig.ckpt

The model, its exit block and sizes come from the checkpoint (its args/config, else its shapes, else the
paper's: SiT-XL/2 or LightningDiT-XL/1 with the exit head after block 8); --model and --exit override them.
The decoder (--vae) and the latent normalisation (--latent_stats) default to the paper's for each format
(SD-VAE ft-EMA with its 0.18215; VA-VAE f16d32 with its latents_stats.pt), read from local paths or the
Hugging Face cache only.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

from jsonargparse.typing import PositiveFloat, PositiveInt

from igdit.commands.common import add_config_option, refuse_misplaced_files, underscore_options
from igdit.config import ConfigError, config_parser
from igdit.official import FORMATS, IMPORT_STAGES, WEIGHTS, import_official


def build_parser():
    parser = config_parser(prog="igdit import-ckpt", description=__doc__)
    add_config_option(parser)
    parser.add_argument("--from", dest="format", type=str, required=True, help="the checkpoint's format: "
                        + ", ".join(FORMATS))
    parser.add_argument("file", type=str, help="the checkpoint to import")
    parser.add_argument("--out", type=str, required=True, help="the Lightning checkpoint to write")
    parser.add_argument("--model", type=Optional[str], default=None,
                        help="backbone name, e.g. SiT-XL/2 (default: from the checkpoint, else the paper's)")
    parser.add_argument("--exit", dest="exits", type=Optional[Union[PositiveInt, list[PositiveInt]]], default=None,
                        help="1-based block of the IG exit head, or a list (default: the checkpoint's encoder_depth, "
                             "else 8)")
    parser.add_argument("--vae", type=Optional[str], default=None,
                        help="decoder: sd-vae-ft-ema, vavae-f16d32[:<checkpoint>], ldm-vae:<checkpoint>, "
                             "diffusers:<folder> (default: the format's: "
                             + ", ".join(f"{k} {f.vae}" for k, f in FORMATS.items()) + ")")
    parser.add_argument("--latent_stats", type=Optional[str], default=None,
                        help="latents_stats.pt (per-channel mean and std) to normalise latents with (default: "
                             "LightningDiT: VA-VAE's from the Hugging Face cache; SiT: the VAE's 0.18215)")
    parser.add_argument("--latent_multiplier", type=Optional[PositiveFloat], default=None,
                        help="LightningDiT's latent_multiplier (default: the checkpoint config's, else 1.0)")
    parser.add_argument("--resolution", type=Optional[PositiveInt], default=None,
                        help="training image side (default: the checkpoint's, else 256)")
    parser.add_argument("--weights", type=Literal[WEIGHTS], default="ema", help="which weights of a training checkpoint")
    parser.add_argument("--input_size", type=Optional[PositiveInt], default=None, help="latent side (default: from the shapes)")
    parser.add_argument("--in_channels", type=Optional[PositiveInt], default=None,
                        help="latent channels (default: from the shapes)")
    parser.add_argument("--num_classes", type=Optional[PositiveInt], default=None, help="classes (default: from the shapes)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def main(argv: Sequence[str]) -> int:
    """`igdit import-ckpt ...`: 0 on success; a bad value raises ConfigError (one line from the dispatcher)."""
    parser = build_parser()
    argv = underscore_options(list(argv), parser, "import-ckpt")
    refuse_misplaced_files(argv, "import-ckpt")
    args = parser.parse_args(argv)
    import torch
    from tqdm import tqdm

    fmt, source = args.format, args.file
    if fmt not in FORMATS:
        raise ConfigError("--from", fmt, "choose " + ", ".join(repr(f) for f in FORMATS))
    exits = None if args.exits is None else [int(e) for e in ([args.exits] if isinstance(args.exits, int) else args.exits)]
    with tqdm(total=len(IMPORT_STAGES), desc="importing", unit="stage", leave=False, disable=None) as bar:  # TTY only
        def progress(stage: str) -> None:
            bar.set_postfix_str(stage)
            bar.update(1)

        out = import_official(source, fmt, args.out, model=args.model, exits=exits, vae=args.vae or "default",
                              latent_stats=args.latent_stats, latent_multiplier=args.latent_multiplier,
                              resolution=args.resolution, input_size=args.input_size, in_channels=args.in_channels,
                              num_classes=args.num_classes, weights=args.weights, overwrite=args.overwrite,
                              progress=progress)
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    backbone, imported = ckpt["hyper_parameters"]["backbone"]["init_args"], ckpt["igdit_import"]
    meta = ckpt["igdit_data_meta"]
    n_params = sum(v.numel() for v in ckpt["state_dict"].values())  # as the official count: pos_embed included
    print(f"imported {source} ({imported['layout']}, weights {imported['weights']})")
    print(f"  model       {imported['model']} exits {backbone['exits']} input {backbone['in_channels']}x"
          f"{backbone['input_size']}x{backbone['input_size']} classes {backbone['num_classes']}")
    print(f"  loaded      {len(ckpt['state_dict'])} keys, {n_params:,} parameters")
    print(f"  steps       {ckpt['global_step']} (epoch {ckpt['epoch']})")
    print(f"  decoder     {meta['encoder']['name']} from {meta['encoder'].get('loaded_from')} (downsampling "
          f"{meta['encoder']['downsampling']}, {meta['resolution']} px); normaliser {meta['normalizer_fit']['method']}")
    print(f"  written to  {out}  (igdit sample --ckpt {out} ...)")
    return 0
