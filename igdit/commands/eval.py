"""`igdit eval`: the training-time Fréchet distance, offline.

    igdit eval --ckpt runs/<exp>/<run>/checkpoints/last.ckpt --experiment experiments/default.yaml [-- --x.y value]
        runs `igdit validate` on the checkpoint with the experiment's FIDCallback (same settings, same code path
        as during training; the result is logged to MLflow as a new run) and prints the numbers; options after
        `--` override the experiment as on `igdit fit`;
    igdit eval --npz samples.npz --ref data/digits [--split train] [--feature digits]
    igdit eval --npz samples.npz --ref VIRTUAL_imagenet256_labeled.npz --feature inception
        scores an existing sample file (ADM layout: arr_0 N x H x W x 3 uint8) against a data folder's split
        (decoded from its shards) or a reference .npz holding mu and sigma.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal, Optional, Sequence

from jsonargparse.typing import PositiveInt

from igdit.commands.common import add_config_option, refuse_misplaced_files, underscore_options
from igdit.config import ConfigError, config_parser


def build_parser():
    parser = config_parser(prog="igdit eval", description=__doc__)
    add_config_option(parser)
    parser.add_argument("--ckpt", type=Optional[str], default=None,
                        help="igdit checkpoint to evaluate with the experiment's FIDCallback")
    parser.add_argument("--experiment", type=Optional[str], default=None,
                        help="experiment YAML whose trainer.callbacks hold an igdit.callbacks.FIDCallback")
    parser.add_argument("--npz", type=Optional[str], default=None, help="sample file to score (arr_0: N x H x W x 3 uint8)")
    parser.add_argument("--ref", type=Optional[str], default=None,
                        help="data folder (its shards, decoded) or reference .npz with mu and sigma")
    parser.add_argument("--split", type=Literal["train", "val"], default="train", help="split of a data folder --ref")
    parser.add_argument("--feature", type=Optional[Literal["digits", "inception"]], default=None,
                        help="feature network (default: digits for an identity-encoded data folder, else inception)")
    parser.add_argument("--inception_weights", type=Optional[str], default=None,
                        help="FID-Inception weights file (default: torch.hub cache)")
    parser.add_argument("--batch_size", type=PositiveInt, default=250, help="images per feature-network batch")
    return parser


def load_sample_file(path: str, field: str = "--npz"):
    """An ADM-layout sample file -> uint8 tensor (N, 3, H, W)."""
    import numpy as np
    import torch

    if not Path(path).is_file():
        raise ConfigError(field, path, "is not a file; pass a sample .npz written by `igdit sample`")
    try:
        images = np.load(path)["arr_0"]
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(field, path, f"could not be read as an .npz with arr_0 ({err!r})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(field, path, f"holds arr_0 {images.shape} {images.dtype}; expected N x H x W x 3 uint8")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _stored_array_shape(path: str, name: str) -> Optional[tuple]:
    """The shape of array ``name`` in an .npz, read from its header (a reference batch of 10,000 256x256 images is
    2 GB: not read for this), or None when it has none."""
    import zipfile

    import numpy as np

    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as member:
            version = np.lib.format.read_magic(member)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            return tuple(read(member)[0])
    except (KeyError, OSError, ValueError, zipfile.BadZipFile):
        return None


def check_reference_matches(images, npz: str, ref: str, datamodule) -> None:
    """The samples (uint8 (N, 3, H, W)) and the reference must show the same kind of images: the same size, no
    colour against a grey data set, and the same source when the sample file names it (`igdit sample` records it).
    A Fréchet distance across data sets is a number that means nothing (RGB noise against the digits scored a
    plausible 0.65)."""
    import numpy as np

    height, width = images.shape[-2:]
    grey = bool((images[:, :1] == images[:, 1:]).all())
    if datamodule is not None:
        channels, ref_height, ref_width = datamodule.meta["image_shape"]
        source = datamodule.meta.get("source")
    else:
        shape = _stored_array_shape(ref, "arr_0")  # the ADM suite's reference batches carry their images
        channels, ref_height, ref_width, source = 3, *(shape[1:3] if shape and len(shape) == 4 else (None, None)), None
    if ref_height is not None and (ref_height, ref_width) != (height, width):
        raise ConfigError("--ref", ref, f"holds {ref_height}x{ref_width} images and {npz} {height}x{width} samples; "
                                        "score samples against the data set their model learned")
    if channels == 1 and not grey:
        raise ConfigError("--ref", ref, f"holds grey (1-channel) images and {npz} colour samples; score samples "
                                        "against the data set their model learned")
    try:
        stored = np.load(npz)
        sampled = str(stored["source"]) if "source" in stored.files else None
    except (OSError, ValueError):
        sampled = None
    if sampled is not None and source is not None and sampled != source:
        raise ConfigError("--ref", ref, f"was built from {source!r} and {npz} sampled a model of {sampled!r}; score "
                                        "samples against the data set their model learned")


def score_sample_file(npz: str, ref: str, split: str = "train", feature: Optional[str] = None,
                      inception_weights: Optional[str] = None, batch_size: int = 250) -> dict:
    """Fréchet distance (and IS on Inception) of a sample file against a data folder's split or a stats file.
    Returns the evaluator's result plus "metric" (fd_digits or fid)."""
    from tqdm import tqdm

    from igdit.data import LatentDataModule
    from igdit.metrics.evaluate import FrechetEvaluator
    from igdit.metrics.fid import ReferenceStats, warn_if_singular

    images = load_sample_file(npz)
    if ref is None:
        raise ConfigError("--ref", ref, "pass a data folder or a reference .npz with mu and sigma")
    try:
        datamodule = LatentDataModule(root=ref) if Path(ref).is_dir() else None
    except ConfigError as err:  # the data module names its own field (data.root); here the user typed --ref
        if err.field != "data.root":
            raise
        raise ConfigError("--ref", ref, err.allowed) from None
    check_reference_matches(images, npz, ref, datamodule)
    if feature is None:  # pixel-space data (the digits) has its own feature network; image data sets use Inception
        feature = "digits" if datamodule is not None and datamodule.meta["encoder"]["name"] == "identity" else "inception"
    evaluator = FrechetEvaluator(feature, datamodule, inception_weights, field="--feature",
                                 weights_field="--inception_weights")
    warn_if_singular(len(images), evaluator.num_features, "--npz")
    if datamodule is not None:
        evaluator.reference_from_data(datamodule, split, batch_size)
    else:
        evaluator.use_reference(ReferenceStats.load(ref, evaluator.num_features, feature, "--ref"))
    batches = tqdm(images.split(batch_size), desc="scoring samples", unit="batch", leave=False)
    return evaluator.score(batches) | {"metric": evaluator.metric_name}


def evaluate_checkpoint(ckpt: str, experiment: Optional[str], overrides: Sequence[str]) -> dict[str, dict]:
    """`igdit validate --config <experiment> --ckpt_path <ckpt>` with the experiment's FIDCallback; its results.

    The MLflow run is named ``eval-step<N>-<checkpoint>`` and tagged as an evaluation with the checkpoint's path,
    sha256, step and training run; its metrics and grids are logged at the checkpoint's step."""
    import hashlib

    from igdit.callbacks import FIDCallback
    from igdit.checkpoints import read_checkpoint
    from igdit.experiment import run_lightning_cli
    from igdit.tracking import MLflowLogger

    checkpoint = read_checkpoint(ckpt)  # one-line errors for what is not a safe igdit checkpoint, before anything
    if experiment is None:
        raise ConfigError("--experiment", experiment, "pass the experiment YAML whose FIDCallback defines the evaluation")
    cli = run_lightning_cli(["--config", experiment, *overrides], run=False)
    callback = next((cb for cb in cli.trainer.callbacks if isinstance(cb, FIDCallback)), None)
    if callback is None:
        raise ConfigError("--experiment", experiment, "has no igdit.callbacks.FIDCallback in trainer.callbacks")
    logger = cli.trainer.logger
    if isinstance(logger, MLflowLogger):
        digest = hashlib.sha256()
        with open(ckpt, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
        step = int(checkpoint.get("global_step", 0))
        trained_in = (checkpoint.get("igdit_run") or {}).get("run_id")
        logger.name_run(f"eval-step{step}-{Path(ckpt).stem}", {
            "igdit.role": "evaluation", "igdit.checkpoint.path": str(Path(ckpt).resolve()),
            "igdit.checkpoint.sha256": digest.hexdigest(), "igdit.checkpoint.step": step,
            **({"igdit.checkpoint.run_id": trained_in} if trained_in else {}),
            "mlflow.note.content": f"`igdit eval` of {Path(ckpt).resolve()} (step {step})"
                                   + (f", trained in run {trained_in}" if trained_in else "")})
    with warnings.catch_warnings():
        # the experiment's ModelCheckpoints restore their state from the checkpoint and say that the run folder
        # changed; an evaluation saves no checkpoint
        warnings.filterwarnings("ignore", message="The dirpath has changed from")
        cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, verbose=False, weights_only=True)
    return {f"{callback.metric_name}/{name}": result for name, result in callback.last_results.items()}


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    argv = underscore_options(list(argv), parser, "eval")
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    options = argv[: argv.index("--")] if "--" in argv else argv
    refuse_misplaced_files(options, "eval", experiment_option="--experiment")
    args = parser.parse_args(options)
    if args.npz is not None:
        if overrides or args.ckpt:
            raise ConfigError("igdit eval", " ".join(overrides) or args.ckpt, "--npz scores a sample file; "
                              "--ckpt and experiment overrides belong to checkpoint evaluation")
        result = score_sample_file(args.npz, args.ref, args.split, args.feature, args.inception_weights,
                                   args.batch_size)
        line = f"{result['metric']} {result['fd']:.4f}  ({result['num_samples']} samples vs {args.ref}"
        line += f", split {args.split})" if Path(args.ref).is_dir() else ")"
        if "is" in result:
            line += f"  IS {result['is']:.2f} +- {result['is_std']:.2f}"
        print(line)
        return 0
    if args.ckpt is None:
        raise ConfigError("igdit eval", None, "pass --ckpt and --experiment, or --npz and --ref")
    results = evaluate_checkpoint(args.ckpt, args.experiment, overrides)
    for name, result in results.items():
        extra = f"  IS {result['is']:.2f}" if "is" in result else ""
        print(f"{name:<24} {result['fd']:10.4f}{extra}   ({result['num_samples']} samples, NFE {result['nfe']}, "
              f"{result['seconds']:.1f} s)")
    return 0
