"""`igdit sample`: images from a checkpoint with any sampler and guidance, as an ADM-suite .npz and a grid.

    igdit sample --ckpt model.ckpt --sampler sde --steps 250 --ig.scale 1.4 --ig.interval [0,1] \\
        --cfg.scale 1.35 --cfg.interval [0,0.7] --num 50000 --labels random --out samples/
    igdit sample --ckpt sit_xl2_ig.ckpt --preset sit-xl2-ig-cfg --num 50000 --out samples/

The checkpoint's `state_dict` holds the EMA weights (Lightning's EMAWeightAveraging puts them there) and its
hyper-parameters rebuild the model, so no experiment YAML is needed. Guidance flags come from the rule classes
(``--<rule>.<field>``: ig, cfg, ag), and ``--guidance`` takes any rule, a new one by its import path, as the
FIDCallback's settings do; a preset sets the published sampler, grid, guidance and labels, and flags given on the
command line override it. Under torchrun each rank generates the indices i = rank (mod world),
writes its part, and rank 0 merges the parts into `samples.npz` (`arr_0`: N x H x W x 3 uint8, in index order,
the layout the ADM evaluation suite reads; `labels`: N class labels).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal, Optional

import torch
import yaml
from jsonargparse import Namespace
from jsonargparse.typing import NonNegativeInt, PositiveInt

from igdit.commands.common import add_config_option, refuse_misplaced_files, underscore_options
from igdit.config import ConfigError, config_parser
from igdit.distributed import check_device
from igdit.generation import Sampling
from igdit.guidance import RULES
from igdit.presets import PRESETS


def build_parser():
    parser = config_parser(prog="igdit sample", description=__doc__)
    add_config_option(parser)
    parser.add_argument("--ckpt", type=str, required=True, help="igdit checkpoint (EMA weights in its state_dict)")
    parser.add_argument("--experiment", type=Optional[str], default=None,
                        help="the experiment YAML the checkpoint was trained with (optional; given, its model "
                             "section must agree with the checkpoint)")
    parser.add_argument("--preset", type=Optional[Literal[tuple(PRESETS)]], default=None,
                        help="a published setting: " + ", ".join(PRESETS))
    parser.add_class_arguments(Sampling, None, help="sampler and time grid")
    for key, rule in RULES.items():
        parser.add_class_arguments(rule, key, help=f"guidance rule {rule.__name__} (scale 1 is off)")
    parser.add_argument("--guidance", type=Optional[dict], default=None,
                        help="guidance as FIDCallback's settings take it: {rule: {fields}}, each rule by key ("
                             + ", ".join(RULES) + ") or the import path of a GuidanceRule subclass of your own, e.g. "
                             "'{ig: {scale: 1.4}, mypackage.rules.MyRule: {scale: 2.0}}'; the fields it names win over "
                             "the per-rule flags and the preset")
    parser.add_argument("--num", type=PositiveInt, default=100, help="number of samples (the paper: 50000)")
    parser.add_argument("--batch_size", type=PositiveInt, default=100, help="samples per batch and rank")
    parser.add_argument("--labels", type=Literal["random", "balanced"], default="random",
                        help="random or balanced (the 1.19 vs 1.07 FID of the paper)")
    parser.add_argument("--seed", type=NonNegativeInt, default=0)
    parser.add_argument("--out", type=str, default="samples", help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace samples.npz/samples.png in --out")
    parser.add_argument("--device", type=Optional[str], default=None, help="default: cuda if available, else cpu")
    return parser


def named_preset(argv: list[str]) -> Optional[str]:
    """The preset ``argv`` names (``--preset x``, ``--preset=x``, or ``preset:`` in a -c/--config file; the last
    one given wins, as when parsing), read before parsing so that its values are in place for --print_config."""
    found = None
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv) or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if arg.startswith("--config=") else argv[i + 1]
            try:
                found = (yaml.safe_load(Path(path).read_text()) or {}).get("preset", found)
            except (OSError, yaml.YAMLError, AttributeError):
                pass  # the parser reports the file
        elif arg == "--preset" and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith("--preset="):
            found = arg.split("=", 1)[1]
    return found if found in PRESETS else None  # an unknown name: the parser's one-line error


def parse(argv: list[str]) -> Namespace:
    """A named preset's values become the defaults that the given options override (and that --print_config
    prints)."""
    parser = build_parser()
    argv = underscore_options(list(argv), parser, "sample")
    refuse_misplaced_files(argv, "sample", experiment_option="--experiment")
    preset = named_preset(argv)
    if preset is not None:
        preset = PRESETS[preset]
        defaults = {f"{key}.{name}": value for key, fields in preset.guidance.items() for name, value in fields.items()}
        defaults |= {k: v for k, v in vars(preset.sampling).items()} | {"labels": preset.labels}
        parser.set_defaults(defaults)
    return parser.parse_args(argv)


def check_experiment(experiment: str, hparams: dict) -> None:
    """One-line ConfigError when the experiment's model section disagrees with the checkpoint's model."""
    from igdit.checkpoints import model_config
    from igdit.experiment import parse_experiment

    if not Path(experiment).is_file():
        raise ConfigError("--experiment", experiment, "is not a file; pass the experiment YAML, e.g. "
                                                      "experiments/default.yaml")
    mine = parse_experiment(experiment).model.backbone
    theirs = model_config(hparams)["backbone"]
    if mine.class_path != theirs["class_path"]:
        raise ConfigError("--experiment model.backbone", mine.class_path,
                          f"the checkpoint was trained with {theirs['class_path']}")
    for key, value in vars(mine.init_args).items():
        if key in theirs["init_args"] and theirs["init_args"][key] != value:
            raise ConfigError(f"--experiment model.backbone.{key}", value, f"the checkpoint was trained with "
                              f"{key} {theirs['init_args'][key]!r}; pass the experiment it was trained with")


def main(argv: list[str]) -> int:
    args = parse(argv)
    import numpy as np  # what sampling needs, imported once the options are parsed (not for --help)

    from igdit.checkpoints import load_module, read_checkpoint
    from igdit.generation import class_labels, generate, rank_indices
    from igdit.guidance import build_rules
    from igdit.guidance.base import rule_class
    from igdit.images import save_grid
    from igdit.presets import get_preset

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    # Everything is checked before a single sample is drawn.
    sampling = Sampling.checked("--", **{k: args[k] for k in vars(Sampling()).keys()})
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", str(out), "is a file; --out names the folder samples.npz and samples.png go into")
    existing = [p for p in (out / "samples.npz", out / "samples.png") if p.exists()]
    if existing and not args.overwrite:
        raise ConfigError("--out", str(out), f"already holds {existing[0].name}; pass --overwrite or another folder")
    foreign = sorted(out.glob("part-*-of-*.npz")) if out.is_dir() else []
    if foreign:  # the rank parts are written and deleted here: never touch files this command did not write
        raise ConfigError("--out", str(out), f"holds {foreign[0].name}, which this command would overwrite and "
                                             "delete; move it away or choose another folder")
    spec = {key: vars(args[key]) for key in RULES}  # the per-rule flags (and the preset's values)
    for key, fields in (args.guidance or {}).items():
        key = rule_class(key, f"guidance.{key}").key or key  # an import path of a registered rule: one entry
        spec[key] = {**spec.get(key, {}), **(fields or {})}
    rules = build_rules(spec, "guidance")
    if args.experiment is not None:
        check_experiment(args.experiment, read_checkpoint(args.ckpt)["hyper_parameters"])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device, "--device")
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    module = load_module(args.ckpt, device=device)
    if args.preset:
        get_preset(args.preset, module.backbone)
    if module.data_meta is None:
        raise ConfigError("--ckpt", args.ckpt, "carries no shard meta.json (encoder and normaliser), so its latents "
                          "cannot be decoded to images; train it with igdit or import it with its VAE (--vae)")
    labels = class_labels(args.num, module.num_classes, args.labels, args.seed)

    indices = rank_indices(args.num, rank, world)
    start = time.perf_counter()
    images, nfe, denoiser = generate(module, rules, sampling, indices, labels[indices], args.seed, args.batch_size,
                                     progress=rank == 0)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    part = out / f"part-{rank:05d}-of-{world:05d}.npz"
    np.savez(part, arr_0=images, indices=np.asarray(indices))
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        merged = merge_parts(out, world, args.num)
        # source: the data set the model learned (igdit eval --npz refuses a reference of another one)
        source = {"source": np.str_(module.data_meta["source"])} if module.data_meta.get("source") else {}
        np.savez(out / "samples.npz", arr_0=merged, labels=labels.numpy(), **source)
        grid = out / "samples.png"
        if args.overwrite and grid.exists():
            grid.unlink()
        save_grid(torch.from_numpy(merged).permute(0, 3, 1, 2), grid)
        batches = -(-len(indices) // args.batch_size)
        print(f"wrote {out / 'samples.npz'} (arr_0 {tuple(merged.shape)} uint8) and {grid}")
        print(f"sampler {sampling.sampler}, {sampling.steps} steps: NFE {nfe} per sample; network forward passes "
              f"{denoiser.network_passes // max(batches, 1)} per batch, relative cost "
              f"{denoiser.network_rows / max(nfe * len(indices), 1):.3f} x an unguided run; {seconds:.1f} s on rank 0")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def merge_parts(out: Path, world: int, num: int):
    """Merge part-*-of-<world>.npz into one (num, H, W, 3) uint8 array in sample-index order, then remove the parts."""
    import numpy as np

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
