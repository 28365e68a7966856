"""`make bench`: measure the speed and memory targets side by side in one run and write a report.

Targets: the default run's training part <= 8 min on 2 CPU cores; the exit head costs <= 1% of a training
step against the same backbone without it; peak memory of the default run < 4 GiB; IG adds no forward pass
in sampling; one FID evaluation costs <= 20% of the training time between two, in memory flat in K;
streaming SD-VAE-shaped latents (4x32x32 float16) >= 20x what SiT-XL/2 training consumes per GPU; the
encoder's images/s for `igdit data build`; each loss term's step time and FLOPs against the plain diffusion
loss, and what its extra networks cost at paper scale (``igdit.bench.terms``); LightningDiT + IG sampling and
posterior-shard streaming (``igdit.bench.lightningdit``; XL/1 timings need a GPU); and, not a timing, how far float16
moves stored posterior means against the posterior's std (``moments_rounding_error``); how long `igdit --help` and
a subcommand's `--help` take in a fresh process (``help_start_times``; target: under 2 s on an idle machine); and
what Lightning's loop and igdit's callbacks cost against a hand-written loop of the same steps (``igdit.bench.loop``).
Timings on a shared machine are noisy: the exit-head comparison interleaves the two variants and reports
the median of per-round ratios. `--only data|terms|st|lightningdit|moments|cli|loop|gpu` runs one part alone and replaces
its sections in the report, keeping the other sections' numbers; `--gpu` (``make bench-gpu``) is `--only gpu`:
paper-scale training, sampling, FID during training and data streaming on one accelerator (``igdit.bench.gpu``).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from igdit.bench import machine as bench_machine


def _training_step_seconds(module, optimizer, x, y, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss, _ = module.compute_loss(x, y, step=0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def exit_head_overhead(config: str, rounds: int = 40, steps: int = 2) -> dict:
    """Median over interleaved rounds of (step time with the exit head) / (step time without it)."""
    import yaml

    from igdit.module import build_module

    model_args = yaml.safe_load(Path(config).read_text())["model"]
    batch = yaml.safe_load(Path(config).read_text())["data"]["batch_size"]
    torch.manual_seed(0)
    with_exit = build_module(model_args)
    torch.manual_seed(0)
    plain = copy.deepcopy(model_args)
    plain["backbone"]["init_args"]["exits"] = []
    plain["terms"] = {"diffusion": model_args["terms"]["diffusion"]}
    without = build_module(plain)
    shape = with_exit.latent_shape
    x, y = torch.randn(batch, *shape), torch.randint(0, with_exit.num_classes, (batch,))
    variants = {"with_exit": with_exit, "without_exit": without}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in variants.items()}
    for k, m in variants.items():  # warm-up
        _training_step_seconds(m, optimizers[k], x, y, 3)
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, m in variants.items():
            times[k].append(_training_step_seconds(m, optimizers[k], x, y, steps))
    ratios = [a / b for a, b in zip(times["with_exit"], times["without_exit"])]
    params = {k: sum(p.numel() for p in m.backbone.parameters()) for k, m in variants.items()}
    flops = {k: m.training_flops(batch) for k, m in variants.items()}
    return {
        "flops_with_exit": flops["with_exit"], "flops_without_exit": flops["without_exit"],
        "flops_ratio": flops["with_exit"] / flops["without_exit"],
        "batch": batch, "rounds": rounds, "steps_per_round": steps,
        "step_ms_with_exit": 1000 * statistics.median(times["with_exit"]),
        "step_ms_without_exit": 1000 * statistics.median(times["without_exit"]),
        "median_ratio": statistics.median(ratios), "ratios": ratios,
        "params_with_exit": params["with_exit"], "params_without_exit": params["without_exit"],
    }


def sampling_cost(config: str, rounds: int = 5, steps: int = 50, batch: int = 100) -> dict:
    """Euler sampling on the default model: NFE, network rows and wall time of each guidance setting,
    interleaved over rounds; ratios against the unguided run (median over rounds)."""
    import yaml

    from igdit.guidance import ClassifierFreeGuidance, Denoiser, InternalGuidance
    from igdit.module import build_module
    from igdit.samplers import euler_ode, uniform_grid

    model_args = yaml.safe_load(Path(config).read_text())["model"]
    torch.manual_seed(0)
    module = build_module(model_args).eval()
    with torch.no_grad():
        for p in module.backbone.parameters():  # cost does not depend on the values; avoid all-zero heads
            p.add_(0.02 * torch.randn_like(p))
    settings = {
        "none": [],
        "ig w=2 on [0,1]": [InternalGuidance(2.0)],
        "cfg 1.5 on [0,1]": [ClassifierFreeGuidance(1.5)],
        "cfg 1.5 on [0,0.7]": [ClassifierFreeGuidance(1.5, (0.0, 0.7))],
        "ig 2 + cfg 1.5 on [0,0.7]": [InternalGuidance(2.0), ClassifierFreeGuidance(1.5, (0.0, 0.7))],
    }
    noise = torch.randn(batch, *module.latent_shape)
    labels = torch.randint(0, module.num_classes, (batch,))
    times = {k: [] for k in settings}
    counts = {}
    for _ in range(rounds):
        for name, rules in settings.items():
            denoiser = Denoiser(module.backbone, rules)
            start = time.perf_counter()
            _, nfe = euler_ode(denoiser, noise, labels, uniform_grid(steps))
            times[name].append(time.perf_counter() - start)
            counts[name] = (nfe, denoiser.network_rows / (nfe * batch))
    base = times["none"]
    return {name: {"nfe": counts[name][0], "rows_ratio": counts[name][1],
                   "seconds": statistics.median(times[name]),
                   "time_ratio": statistics.median(a / b for a, b in zip(times[name], base))}
            for name in settings} | {"_steps": steps, "_batch": batch, "_rounds": rounds}


def default_run(config: str, extra: list[str]) -> dict:
    """Run `igdit fit` as a user would (own process) into a scratch MLflow store; wall time, peak RSS."""
    from mlflow.tracking import MlflowClient

    scratch = Path(tempfile.mkdtemp(prefix="igdit-bench-"))
    uri = f"sqlite:///{scratch / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "igdit.cli", "fit", "--config", config,
           "--trainer.logger.init_args.tracking_uri", uri,
           "--trainer.logger.init_args.artifact_location", (scratch / "mlartifacts").as_uri(),
           "--trainer.logger.init_args.experiment_name", "bench",
           "--trainer.default_root_dir", str(scratch / "runs"), "--trainer.enable_progress_bar", "false", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"the default run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("bench").experiment_id])[0]
    metrics = run.data.metrics
    history = lambda key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}  # noqa: E731
    eval_seconds, train_time = history("eval/seconds"), history("train/time")
    fd = {key: history(key) for key in metrics if key.startswith(("fd_digits/", "fid/"))}
    return {
        "eval_seconds": eval_seconds, "train_time_at": {step: _at_or_before(train_time, step) for step in eval_seconds},
        "fd_history": fd,
        "wall_seconds_whole_command": wall,
        "train_seconds": metrics.get("train/time"),
        "train_samples": metrics.get("train/samples"),
        "samples_per_sec": (metrics["train/samples"] / metrics["train/time"]) if metrics.get("train/time") else None,
        "final_train_diffusion": metrics.get("train/diffusion"), "final_val_diffusion": metrics.get("val/diffusion"),
        "peak_rss_gib": peak_kib / 2**20, "summary": proc.stdout.strip().splitlines()[-7:],
        "checkpoint": str(next((scratch / "runs" / "bench" / run.info.run_id / "checkpoints").glob("last.ckpt"))),
        "scratch": str(scratch),
    }


def _at_or_before(series: dict[int, float], step: int) -> Optional[float]:
    earlier = [s for s in series if s <= step]
    return series[max(earlier)] if earlier else None


def fid_overhead(run: dict) -> list[dict]:
    """Per FID evaluation of the default run: its seconds against the training seconds since the previous one."""
    rows, previous = [], 0.0
    for step in sorted(run["eval_seconds"]):
        trained = run["train_time_at"][step]
        rows.append({"step": step + 1, "eval_seconds": run["eval_seconds"][step], "train_seconds": trained - previous,
                     "ratio": run["eval_seconds"][step] / max(trained - previous, 1e-9)})
        previous = trained
    return rows


def sampling_sweep(sweep: str, checkpoint: str, scratch: str, n_trials: int = 8) -> dict:
    """A sampling sweep on the default run's checkpoint: one-time set-up (checkpoint, feature network,
    reference), then seconds per trial (sampling + scoring only) and trials per hour."""
    import io

    import optuna

    from igdit.sweeps import SamplingTrial, SweepSpec, run_sweep

    spec = SweepSpec.load(sweep)
    spec.storage = f"sqlite:///{scratch}/optuna.db"
    spec.tracking_uri = f"sqlite:///{scratch}/mlflow.db"
    start = time.perf_counter()
    SamplingTrial(spec, checkpoint)  # what the runner builds once per sweep
    setup = time.perf_counter() - start
    run_sweep(spec, checkpoint, n_trials=n_trials, out=io.StringIO())
    trials = optuna.load_study(study_name=spec.name, storage=spec.storage).trials
    seconds = [t.user_attrs["seconds"] for t in trials if t.state.name == "COMPLETE"]
    per_trial = statistics.median(seconds)
    return {"sweep": sweep, "trials": len(trials), "complete": len(seconds), "setup_seconds": setup,
            "median_trial_seconds": per_trial, "trials_per_hour": 3600 / per_trial,
            "num_samples": trials[0].user_attrs.get("num_samples"), "nfe": trials[0].user_attrs.get("nfe")}


def fid_memory(config: str, data_root: str, num_samples: int) -> dict:
    """Peak resident memory of one FID evaluation with ``num_samples`` images, in a fresh process."""
    code = (
        "import resource, time, yaml, torch\n"
        "from igdit.data import LatentDataModule\n"
        "from igdit.generation import Sampling\n"
        "from igdit.metrics import FrechetEvaluator, evaluate_settings\n"
        "from igdit.module import build_module\n"
        f"model = build_module(yaml.safe_load(open({config!r}))['model'])\n"
        f"dm = LatentDataModule(root={data_root!r})\n"
        "model.data_meta = dm.meta\n"
        "ev = FrechetEvaluator('digits', dm)\n"
        "ev.reference_from_data(dm, 'train')\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "start = time.perf_counter()\n"
        f"res, _ = evaluate_settings(model, {{'none': []}}, ev, {num_samples}, Sampling('euler', 2))\n"
        "print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - start, res['none']['num_samples'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, peak, seconds, n = int(out[0]), int(out[1]), float(out[2]), int(out[3])
    return {"num_samples": n, "peak_rss_gib": peak / 2**20, "growth_mib": (peak - before) / 2**10, "seconds": seconds}


# ---- data: streaming and encoding -------------------------------------------------------------------------
# What SiT-XL/2 training consumes per GPU, the figure the streaming target is 20x of. An upper bound from FLOPs:
# 118.6 GFLOPs per 256x256 image forward (DiT-XL/2, DiT paper Table 4; SiT-XL/2 is the same network), x3 for
# forward + backward, on an H100 (989 dense bf16 TFLOP/s) at 50% MFU. Published measurements are far lower:
# 0.84 steps/s at batch 128 on one A100 with pre-extracted latents (fast-DiT README: 108 images/s) and
# 1.3 it/s at batch 128 per H800 (VideoSys/OpenDiT speed table: 166 images/s).
SIT_XL2_FORWARD_GFLOPS = 118.6
ASSUMED_GPU_TFLOPS = 989 * 0.5
SIT_XL2_SAMPLES_PER_GPU = ASSUMED_GPU_TFLOPS * 1e12 / (3 * SIT_XL2_FORWARD_GFLOPS * 1e9)
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              latent_channels=4, norm_num_groups=32, sample_size=256)  # stabilityai/sd-vae-ft-ema's config.json


def _latent_shards(root: Path, samples: int, per_shard: int) -> Path:
    """Shards of `samples` random 4x32x32 float16 latents, written by the real build (identity encoder)."""
    from igdit.data import ArraySource, build_dataset

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (samples, 4, 32, 32), dtype=torch.uint8, generator=generator)
    source = ArraySource(images, torch.arange(samples) % 10, [str(c) for c in range(10)], {"name": "random"})
    build_dataset(source, root, samples_per_shard=per_shard, val_fraction=0.01, progress=False)
    return root


def streaming_throughput(workers=(1, 2), batch: int = 256, batches: int = 150, samples: int = 24_000,
                         per_shard: int = 1000, rounds: int = 3) -> dict:
    """Samples/s that LatentDataModule delivers through a real DataLoader (one rank), per worker count: the
    median of `rounds` interleaved runs of `batches` batches each."""
    with tempfile.TemporaryDirectory(prefix="igdit-bench-shards-") as scratch:  # ~10 KiB a sample, removed after
        root = _latent_shards(Path(scratch) / "latents", samples, per_shard)
        rates = {n: [] for n in workers}
        for _ in range(rounds):
            for n in workers:
                rates[n].append(_stream(root, n, batch, batches))
        shard_mb = (root / "train-000000.tar").stat().st_size / 2**20
    results = {n: {"samples_per_sec": statistics.median(r), "per_worker": statistics.median(r) / n,
                   "min": min(r), "max": max(r)} for n, r in rates.items()}
    return {"workers": results, "batch": batch, "batches": batches, "samples": samples, "per_shard": per_shard,
            "shard_mib": shard_mb, "sample_shape": (4, 32, 32), "rounds": rounds}


def _stream(root: Path, workers: int, batch: int, batches: int) -> float:
    from igdit.data import LatentDataModule

    dm = LatentDataModule(str(root), batch_size=batch, num_workers=workers, shuffle_buffer=10_000,
                          steps_per_epoch=10**6)
    dm.setup("fit")
    iterator = iter(dm.train_dataloader())
    for _ in range(2 * workers):  # warm-up: workers started, shuffle buffers filled
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    del iterator  # its DataLoader workers shut down with it
    return batches * batch / seconds


def encoder_throughput(vae_images: int = 4, crop_images: int = 64) -> dict:
    """images/s of the parts of `igdit data build`: JPEG decode + ADM crop (one process), and encoding with
    the SD-VAE architecture (random weights: speed does not depend on them) and with the tests' tiny VAE."""
    with tempfile.TemporaryDirectory(prefix="igdit-bench-images-") as scratch:
        crops, crop_rate = _crop_rate(Path(scratch), crop_images)
    return _vae_rates(crops, crop_rate, vae_images)


def _crop_rate(scratch: Path, crop_images: int):
    import numpy as np
    from PIL import Image

    from igdit.data import ImageFolderSource

    rng = np.random.default_rng(0)
    (scratch / "class0").mkdir()
    yy, xx = np.mgrid[0:375, 0:500]
    for i in range(crop_images):  # ImageNet's typical 500x375 JPEG, smooth content so it compresses like a photo
        arr = np.stack([128 + 100 * np.sin(xx / (7 + i % 5 + k) + yy / (11 + k)) for k in range(3)], -1)
        Image.fromarray((arr + rng.normal(0, 8, arr.shape)).clip(0, 255).astype(np.uint8)).save(
            scratch / "class0" / f"{i}.JPEG", quality=90)
    source = ImageFolderSource(str(scratch), 256)
    rates = []
    for _ in range(3):  # median of 3 passes: this machine is shared
        start = time.perf_counter()
        crops = torch.stack([source.read(i) for i in range(len(source))])
        rates.append(len(source) / (time.perf_counter() - start))
    return crops, statistics.median(rates)


def _vae_rates(crops: torch.Tensor, crop_rate: float, vae_images: int) -> dict:
    from diffusers import AutoencoderKL
    from lightning.fabric.utilities.throughput import measure_flops

    def rate(vae, images: torch.Tensor, rounds: int = 3) -> float:
        """Median images/s of `rounds` encoder calls on `images`, after a warm-up call."""
        times = []
        with torch.no_grad():
            vae.encode(images[:1])  # warm-up
            for _ in range(rounds):
                start = time.perf_counter()
                vae.encode(images).latent_dist.sample()
                times.append(time.perf_counter() - start)
        return images.shape[0] / statistics.median(times)

    x = crops[:vae_images].float() / 127.5 - 1
    torch.manual_seed(0)
    sd_vae = AutoencoderKL(**SD_VAE).eval()
    with torch.device("meta"):
        meta_vae = AutoencoderKL(**SD_VAE)
        meta_x = torch.empty(1, 3, 256, 256)
    flops = measure_flops(meta_vae, lambda: meta_vae.encode(meta_x).latent_dist.mean)
    tiny = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16).eval()
    small = torch.nn.functional.interpolate(x, size=(16, 16), mode="area").repeat(16, 1, 1, 1)
    return {"crop_images_per_sec": crop_rate, "crop_images": len(crops),
            "sd_vae_images_per_sec": rate(sd_vae, x), "sd_vae_batch": vae_images,
            "sd_vae_encode_gflops": flops / 1e9, "tiny_vae_images_per_sec": rate(tiny, small),
            "tiny_vae_batch": small.shape[0]}


def data_sections(stream: dict, encode: dict) -> list[str]:
    """The report's data sections (each starts with '## ')."""
    need = 20 * SIT_XL2_SAMPLES_PER_GPU
    one, two = stream["workers"][1], stream["workers"][2]
    eight = 8 * one["per_worker"]
    workers_needed = math.ceil(need / one["per_worker"])
    h100_vae = ASSUMED_GPU_TFLOPS * 1e12 / (encode["sd_vae_encode_gflops"] * 1e9)
    imagenet = 1_281_167
    encode_minutes = 2 * imagenet / (8 * h100_vae) / 60  # with --flip, one node of 8 GPUs
    decode_minutes = imagenet / (64 * encode["crop_images_per_sec"]) / 60  # 64 decoding processes on that node
    return [
        "## Streaming latents (target: >= 20x what SiT-XL/2 training consumes per GPU)\n",
        f"`LatentDataModule` through a real DataLoader, one rank: {stream['samples']:,} random "
        f"{'x'.join(map(str, stream['sample_shape']))} float16 latents in shards of {stream['per_shard']} "
        f"({stream['shard_mib']:.1f} MiB) written by `build_dataset`, shuffle buffer 10,000, batches of "
        f"{stream['batch']}, {stream['batches']} batches timed after warm-up; median of {stream['rounds']} "
        "interleaved rounds (min-max in brackets).\n",
        "| DataLoader workers | samples/s | samples/s per worker |", "|---|---|---|",
        f"| 1 | {one['samples_per_sec']:,.0f} ({one['min']:,.0f}-{one['max']:,.0f}) | {one['per_worker']:,.0f} |",
        f"| 2 | {two['samples_per_sec']:,.0f} ({two['min']:,.0f}-{two['max']:,.0f}) | {two['per_worker']:,.0f} |",
        f"\nSiT-XL/2 consumption assumed per GPU: **{SIT_XL2_SAMPLES_PER_GPU:,.0f} samples/s**, an upper bound: "
        f"{SIT_XL2_FORWARD_GFLOPS} GFLOPs per image forward (DiT paper, Table 4) x 3 for forward + backward on an "
        f"H100 at 50% of its 989 dense bf16 TFLOP/s. Measured figures are lower: 108 images/s per A100 (fast-DiT "
        f"README, 0.84 steps/s at batch 128) and 166 per H800 (VideoSys speed table, 1.3 it/s at batch 128). "
        f"Target: {need:,.0f} samples/s per GPU. One worker gives **{one['per_worker'] / SIT_XL2_SAMPLES_PER_GPU:.1f}x** "
        f"the assumed consumption ({one['per_worker'] / 166:.0f}x the measured H800 figure); the target needs "
        f"{workers_needed} workers per GPU at this per-worker rate, and the paper configs' 8 workers give "
        f"~{eight:,.0f} samples/s = **{eight / SIT_XL2_SAMPLES_PER_GPU:.0f}x** (assuming a core per worker, as "
        "GPU nodes have). This machine has 2 cores shared with the main process and other work, so the "
        "2-worker row is limited by cores, not by the pipeline.\n",
        "## Encoding for `igdit data build` (images/s)\n",
        "| stage | images/s | notes |", "|---|---|---|",
        f"| JPEG decode + ADM centre crop to 256 (one process) | {encode['crop_images_per_sec']:.0f} | "
        f"{encode['crop_images']} synthetic 500x375 JPEGs (ImageNet's typical size), median of 3 passes; "
        "`--workers` run this in parallel |",
        f"| SD-VAE encoder architecture, random weights, 256x256, CPU | {encode['sd_vae_images_per_sec']:.2f} | "
        f"batch {encode['sd_vae_batch']}, median of 3 calls, posterior sample; not the real weights (speed does not depend on them); "
        f"{encode['sd_vae_encode_gflops']:.0f} GFLOPs per image |",
        f"| tests' tiny random AutoencoderKL, 16x16, CPU | {encode['tiny_vae_images_per_sec']:.0f} | "
        f"batch {encode['tiny_vae_batch']}; not the SD-VAE: shows the pipeline's own overhead only |",
        f"\nAt the same 50% of an H100's bf16 peak the SD-VAE encoder would take ~{h100_vae:,.0f} images/s per GPU "
        f"(an estimate from FLOPs: no GPU here). ImageNet on one 8-GPU node: encoding 2 x 1.28M images (`--flip`) "
        f"~{encode_minutes:.0f} min of GPU time; decoding and cropping 1.28M JPEGs with 64 processes at this "
        f"machine's per-process rate ~{decode_minutes:.0f} min. Both are minutes: give each rank `--workers` = "
        "its share of the node's cores so that JPEG decoding keeps up with the GPUs.\n",
    ]


MOMENTS_STDS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def _digits_latent_sets() -> dict[str, torch.Tensor]:
    """The digits' identity-encoder latents, normalised in float32 as `igdit data build` computes them (before
    it rounds them to the stored dtype), each (N, 1, h, w): the default build (8x8, the encoder's normaliser:
    17 grey levels in [-1, 1]) and --resolution 32 --normalizer channel-stats (bilinear upsampling gives
    continuous values, the statistics unit variance, as a VAE's normalised latents have; fitted on all images)."""
    from igdit.data import IdentityEncoder, LatentNormalizer, load_source
    from igdit.data.shards import _to_unit

    images = load_source("digits", None).images
    native = IdentityEncoder().encode(_to_unit(images, None))
    upsampled = IdentityEncoder().encode(_to_unit(images, 32))
    return {"digits 8x8, encoder normaliser": LatentNormalizer.identity(1).normalize(native),
            "digits 32x32 bilinear, channel-stats": LatentNormalizer.from_latents(upsampled).normalize(upsampled)}


def moments_rounding_error(stds=MOMENTS_STDS, dtypes=("float16", "float32")) -> dict:
    """How far storing a posterior's normalised mean m in ``dtype`` moves it, against the posterior's std s:
    |round(m) - m| / s over every element of the digits' latents (``_digits_latent_sets``), for a synthetic s
    (the same at every element) at each level of ``stds`` (fractions of the latents' unit scale). No VAE
    weights are needed: the mean's rounding depends only on m, and s is what it is set against.

    Returns {"rows": [{"latents", "values", "abs_max", "std", "dtype", "max", "mean", "error_max", "std_rel"}, ...],
    "stds"}: max and mean of the ratio; error_max = max |round(m) - m| (no s); abs_max = max |m|;
    std_rel = |round(s) - s| / s, s's own rounding (a draw's spread changes by it)."""
    rows = []
    for name, m in _digits_latent_sets().items():
        for dtype in dtypes:
            error = (m.to(getattr(torch, dtype)).double() - m.double()).abs()
            for std in stds:
                stored = torch.tensor(std, dtype=torch.float32).to(getattr(torch, dtype)).double()
                rows.append({"latents": name, "values": m.numel(), "abs_max": float(m.abs().max()), "std": std,
                             "dtype": dtype, "max": float(error.max()) / std, "mean": float(error.mean()) / std,
                             "error_max": float(error.max()),
                             "std_rel": abs(float(stored) - float(torch.tensor(std, dtype=torch.float32))) / std})
    return {"rows": rows, "stds": list(stds)}


def moments_section(result: dict) -> list[str]:
    """The report's section on ``moments_rounding_error`` (starts with '## ')."""
    from igdit.data import bytes_per_sample

    rows = result["rows"]
    sets = list(dict.fromkeys(r["latents"] for r in rows))
    lines = ["## Posterior moments: float16 vs float32\n",
             "`python -m igdit.bench --only moments` (`igdit.bench.core.moments_rounding_error`; deterministic, no timing). "
             "What storing a posterior's normalised mean m in float16 or float32 (`igdit data build --latent posterior "
             "--moments_dtype`) costs against the posterior's std s: |round(m) - m| / s over every element of the "
             "digits' identity-encoder latents, computed in float32 as the build computes them, with a synthetic s "
             "(the same everywhere) at each level. No SD-VAE weights here, so its real posterior std is not measured. "
             "The default digits build's 17 grey levels 2v/255 - 1 (v integer) happen to lie next to float16 "
             "values; upsampled and normalised to unit variance, the digits' latents are continuous, as a VAE's "
             "are, and show float16's general error, up to 2^-11 |m|.\n"]
    for name in sets:
        mine = [r for r in rows if r["latents"] == name]
        half = next(r for r in mine if r["dtype"] == "float16")
        lines += [f"**{name}** ({half['values']:,} values, |m| <= {half['abs_max']:.2f}; float16 moves m by up to "
                  f"{half['error_max']:.2g}):\n",
                  "| posterior std s | float16 max | float16 mean | float32 max | float32 mean |",
                  "|---|---|---|---|---|"]
        for std in result["stds"]:
            at = {r["dtype"]: r for r in mine if r["std"] == std}
            lines.append(f"| {std:g} | " + " | ".join(f"{at[d][k]:.3g}" if d in at else "-"
                                                       for d in ("float16", "float32") for k in ("max", "mean")) + " |")
        lines.append("")
    std_rel = max(r["std_rel"] for r in rows if r["dtype"] == "float16")
    quoted = [std for std in result["stds"] if std in (1e-3, 1e-2)] or result["stds"][:1]
    small = [r for r in rows if r["latents"] == sets[-1] and r["dtype"] == "float16" and r["std"] in quoted]
    sizes = {d: bytes_per_sample((4, 32, 32), 2, d) for d in ("float16", "float32")}
    lines.append(f"s itself rounds to float16 within {std_rel:.1e} of itself at these levels (a draw's spread hardly "
                 "changes); float32 stores what the encoder computed, exactly (0 above). Default: **float32**: on the "
                 "continuous latents float16 moves m by up to " + " and ".join(
                     f"{r['max']:.2g} s (mean {r['mean']:.2g} s) at s = {r['std']:g}" for r in small) +
                 f", and SD-VAE's s cannot be measured here; the price is {sizes['float32']:,} instead of "
                 f"{sizes['float16']:,} bytes per 4x32x32 posterior sample.\n")
    return lines


HELP_COMMANDS = (("igdit --help", ["--help"], False), ("igdit sample --help", ["sample", "--help"], False),
                 ("igdit fit --help", ["fit", "--help"], False), ("igdit fit --help", ["fit", "--help"], True))


def help_start_times(rounds: int = 3) -> dict:
    """Wall and CPU seconds (median over ``rounds``) of `igdit --help`, `igdit sample --help` and `igdit fit --help`
    in fresh processes, the help page cache empty (what a first call costs) and, for fit, filled (every later one).
    CPU seconds (user + system of the child) are what the wall time would be on an idle machine."""
    rows, load = {}, os.getloadavg()[0]
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="igdit-help-") as cache:
            env = dict(os.environ, XDG_CACHE_HOME=cache, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
            for label, argv, cached in HELP_COMMANDS:
                if cached:  # fill the cache first, untimed
                    subprocess.run([sys.executable, "-m", "igdit", *argv], env=env, capture_output=True, check=True)
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "igdit", *argv], env=env, capture_output=True, check=True)
                wall = time.perf_counter() - start
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                row = rows.setdefault((label, cached), {"wall": [], "cpu": []})
                row["wall"].append(wall)
                row["cpu"].append(cpu)
    return {"rounds": rounds, "load_before": load, "date": time.strftime("%Y-%m-%d"),
            "rows": [{"command": label, "cache": "filled" if cached else "empty",
                      "wall_s": statistics.median(r["wall"]), "cpu_s": statistics.median(r["cpu"])}
                     for (label, cached), r in rows.items()]}


def help_section(result: dict) -> list[str]:
    lines = ["## Command-line start (target: `igdit --help` and a subcommand's `--help` under 2 s on an idle "
             "machine)\n",
             f"Measured {result['date']} by `python -m igdit.bench --only cli` (load average "
             f"{result['load_before']:.1f} before). A fresh `python -m igdit ...` process per call, median of "
             f"{result['rounds']} rounds (`igdit.bench.core.help_start_times`). CPU seconds (user + system) stand "
             "for the wall time on an idle machine. `fit` needs Lightning to build its parser (its Trainer's "
             "options are the help), so its page is kept after the first call, keyed by igdit's source files and "
             "the libraries' versions (`igdit.commands.helpcache`).\n",
             "| command | help page cache | wall (s) | CPU (s) |", "|---|---|---|---|"]
    lines += [f"| `{r['command']}` | {r['cache']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} |" for r in result["rows"]]
    return lines + [""]


def _merge_sections(report: str, sections: list[str]) -> str:
    """Replace the report's sections whose '## ' title starts like one in `sections`; append the others."""
    new = "\n".join(sections).split("\n## ")
    new = [new[0]] + ["## " + part for part in new[1:]]
    parts = report.rstrip("\n").split("\n## ")
    parts = [parts[0]] + ["## " + part for part in parts[1:]]
    for section in new:
        title = section.split("(")[0].split("\n")[0].strip()
        index = next((i for i, p in enumerate(parts) if p.startswith(title)), None)
        if index is None:
            parts.append(section.rstrip("\n"))
        else:
            parts[index] = section.rstrip("\n")
    return "\n\n".join(p.rstrip("\n") for p in parts) + "\n"


def _data_part(args) -> list[str]:
    return data_sections(streaming_throughput(), encoder_throughput())


def _terms_part(args) -> list[str]:
    from igdit.bench import terms as bench_terms

    return bench_terms.sections(bench_terms.digits_step_costs(args.data), bench_terms.paper_scale_extra_flops())


def _st_part(args) -> list[str]:
    from igdit.bench import terms as bench_terms

    return bench_terms.st_sections(bench_terms.st_teacher_costs(args.data))


def _moments_part(args) -> list[str]:
    return moments_section(moments_rounding_error())


def _cli_part(args) -> list[str]:
    return help_section(help_start_times())


def _loop_part(args) -> list[str]:
    from igdit.bench.loop import loop_overhead, loop_section

    return loop_section(loop_overhead(args.config, args.data))


def _lightningdit_part(args) -> list[str]:
    """XL/1 with the published 124 Heun steps on a GPU; on a CPU a smaller model and schedule, said so."""
    from igdit.bench import lightningdit as bench_ldit

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        sampling = bench_ldit.sampling_throughput(device=device)
    else:
        sampling = bench_ldit.sampling_throughput("B/1", batch=4, steps=6, rounds=3, device=device)
    lines = bench_ldit.sections(sampling, bench_ldit.posterior_streaming(), SIT_XL2_SAMPLES_PER_GPU)
    if not device.startswith("cuda"):
        lines.insert(1, "No GPU here: LightningDiT-B/1 (not XL/1) and 6 Heun steps (not 124) on the CPU; the XL/1 "
                        "figures come from `python -m igdit.bench --only lightningdit --device cuda`.\n")
    return lines


def _gpu_part(args) -> list[str]:
    """Paper-scale training, sampling, FID and data on one accelerator (``igdit.bench.gpu``); --device cpu --tiny
    checks the script on a CPU with tiny models."""
    from igdit.bench import gpu as bench_gpu

    plan = bench_gpu.Plan.tiny_cpu(args.device) if args.tiny else bench_gpu.Plan(args.device)
    if args.budget is not None:
        plan.budget_s = args.budget
    results = bench_gpu.run(plan, args.models)
    print(json.dumps(results, indent=1, default=str))
    return bench_gpu.sections(results)


PARTS = {"data": _data_part, "terms": _terms_part, "lightningdit": _lightningdit_part, "moments": _moments_part,
         "st": _st_part, "cli": _cli_part, "gpu": _gpu_part, "loop": _loop_part}
# moments, st, cli, gpu, loop: no note of date and load; each section names its command and machine itself (a note
# titled like its part's own section would replace it in the report)
PART_TITLES = {"data": "Data throughput", "terms": "Loss-term cost", "lightningdit": "LightningDiT", "moments": None,
               "st": None, "cli": None, "gpu": None, "loop": None}


def _check_gpu_args(args) -> Optional[str]:
    """The one-line refusal of a --gpu run that cannot run here, or None."""
    from igdit.bench.gpu import MODELS

    if args.device is None:
        if not torch.cuda.is_available():
            return ("error: --gpu: no CUDA device here; run it on a machine with an NVIDIA GPU, or add "
                    "--device cpu --tiny for a CPU check of the script")
        args.device = "cuda"
    if not args.device.startswith(("cuda", "cpu")):
        return f"error: --device: {args.device} is not allowed; cuda, cuda:<index> or cpu (with --tiny)"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return f"error: --device: {args.device} is not allowed; this machine has no CUDA device"
    if args.device == "cpu" and not args.tiny:
        return ("error: --device: cpu is not allowed without --tiny; the paper-scale models need a GPU "
                "(--tiny: tiny models, a CPU check of the script)")
    unknown = [m for m in args.models or [] if m not in MODELS]
    if unknown:
        return f"error: --models: {unknown[0]} is not allowed; choose from " + ", ".join(repr(m) for m in MODELS)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="experiments/default.yaml")
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--data", default="data/digits", help="the digits shards (make data)")
    parser.add_argument("--skip-run", action="store_true", help="skip the default run (8 minutes) and the sweep")
    parser.add_argument("--only", choices=sorted(PARTS), default=None,
                        help="one part (data: streaming and encoders; terms: the loss terms' cost; lightningdit: "
                             "LightningDiT sampling and posterior streaming; moments: float16 vs float32 posterior "
                             "moments; st: Self-Transcendence's teacher under both t-range semantics and "
                             "precisions; cli: `--help` start times; loop: `igdit fit` against a hand-written loop "
                             "of the same steps; gpu: the GPU benchmark), merged into the existing report")
    parser.add_argument("--device", default=None,
                        help="where LightningDiT sampling (and --gpu) is timed (default: cuda if any)")
    parser.add_argument("--gpu", action="store_true",
                        help="the GPU benchmark (make bench-gpu; the same as --only gpu): paper-scale training, "
                             "sampling, FID and data on one accelerator, under --budget seconds")
    parser.add_argument("--tiny", action="store_true", help="with --gpu --device cpu: tiny models, a CPU check")
    parser.add_argument("--budget", type=float, default=None, help="--gpu: seconds the measurements may take (420)")
    parser.add_argument("--models", nargs="+", default=None,
                        help="--gpu: measure only these (default: 'SiT-XL/2 + IG' 'LightningDiT-XL/1 + IG')")
    args, extra = parser.parse_known_args(argv)
    if args.gpu or args.only == "gpu":
        args.only = "gpu"
        refusal = _check_gpu_args(args)
        if refusal:
            print(refusal, file=sys.stderr)
            return 2
    torch.set_num_threads(os.cpu_count() or 1)
    machine = bench_machine()
    load = os.getloadavg()[0]
    if args.only:
        out = Path(args.out)
        report = out.read_text() if out.exists() else "# Benchmarks\n"
        part = PARTS[args.only](args)
        note = [f"## {PART_TITLES[args.only]}\n\nThe sections below were measured {time.strftime('%Y-%m-%d')} on "
                f"{machine} by `python -m igdit.bench --only {args.only}` (load average {load:.1f} before, on a "
                "machine shared with other work: medians of interleaved rounds).\n"] if PART_TITLES[args.only] else []
        out.write_text(_merge_sections(report, note + part))
        print("\n".join(part))
        return 0
    data = PARTS["data"](args)
    overhead = exit_head_overhead(args.config)
    loop = PARTS["loop"](args)
    sampling = sampling_cost(args.config)
    memory = [fid_memory(args.config, args.data, k) for k in (1_000, 10_000)]
    run = None if args.skip_run else default_run(args.config, extra)
    sweep = None if run is None else sampling_sweep("sweeps/ig_guidance.yaml", run["checkpoint"], run["scratch"])
    lines = ["# Benchmarks\n", f"Measured {time.strftime('%Y-%m-%d')} on {machine} by `make bench` "
             f"(`python -m igdit.bench`), config `{args.config}`.\n",
             "## Exit head cost (target: <= 1% of a training step)\n",
             f"Same backbone, same batch ({overhead['batch']}), forward + backward + AdamW step, "
             f"{overhead['rounds']} interleaved rounds of {overhead['steps_per_round']} steps.\n",
             "| variant | params | median step (ms) |", "|---|---|---|",
             f"| exit head + exit loss | {overhead['params_with_exit']:,} | {overhead['step_ms_with_exit']:.1f} |",
             f"| no exit head | {overhead['params_without_exit']:,} | {overhead['step_ms_without_exit']:.1f} |",
             f"\nMedian of per-round time ratios with/without: **{overhead['median_ratio']:.4f}** "
             f"(rounds: min {min(overhead['ratios']):.3f}, max {max(overhead['ratios']):.3f}).",
             f"Forward + backward FLOPs (counted on the meta device): {overhead['flops_with_exit']:,} vs "
             f"{overhead['flops_without_exit']:,}, ratio **{overhead['flops_ratio']:.5f}**.\n"]
    lines += loop
    lines += ["## Sampling cost (targets: IG adds no forward pass and <= 3% time; CFG on an interval costs "
              "1 + the fraction of steps inside it)\n",
              f"Euler, {sampling['_steps']} steps, batch {sampling['_batch']}, default model, "
              f"{sampling['_rounds']} interleaved rounds; ratios against no guidance (median over rounds).\n",
              "| guidance | NFE | network rows / (NFE x batch) | median time (s) | time ratio |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['nfe']} | {r['rows_ratio']:.2f} | {r['seconds']:.2f} | {r['time_ratio']:.3f} |"
              for name, r in sampling.items() if not name.startswith("_")]
    lines += [""]
    if run is not None:
        lines += ["## Default run (targets: training <= 8 min on 2 CPU cores, peak memory < 4 GiB)\n",
                  "| measure | value |", "|---|---|",
                  f"| training time (Lightning ThroughputMonitor `train/time`) | {run['train_seconds']:.0f} s |",
                  f"| samples/s | {run['samples_per_sec']:.0f} |",
                  f"| whole `igdit fit` command (start-up, validation, sample grid) | {run['wall_seconds_whole_command']:.0f} s |",
                  f"| peak resident memory of the run | {run['peak_rss_gib']:.2f} GiB |",
                  f"| final train/diffusion, val/diffusion | {run['final_train_diffusion']:.4f}, {run['final_val_diffusion']:.4f} |",
                  ""]
        lines += ["## FID during training (target: one evaluation <= 20% of the training time between two)\n",
                  "FIDCallback of the default run (settings, K, sampler and steps as in the config), EMA weights.\n",
                  "| step | evaluation (s) | training since the previous one (s) | ratio |", "|---|---|---|---|"]
        lines += [f"| {r['step']} | {r['eval_seconds']:.1f} | {r['train_seconds']:.1f} | {r['ratio']:.3f} |"
                  for r in fid_overhead(run)]
        lines += ["", "Fréchet distance in the digits feature space (lower is better) at each evaluation:\n",
                  "| setting | " + " | ".join(f"step {s + 1}" for s in sorted(run["eval_seconds"])) + " |",
                  "|---|" + "---|" * len(run["eval_seconds"])]
        lines += [f"| {key} | " + " | ".join(f"{values.get(s, float('nan')):.2f}" for s in sorted(run["eval_seconds"]))
                  + " |" for key, values in sorted(run["fd_history"].items())]
        lines += [""]
    if sweep is not None:
        lines += ["## Sampling sweep (target: a trial costs sampling + scoring only)\n",
                  f"`{sweep['sweep']}` on the default run's checkpoint, {sweep['trials']} trials "
                  f"({sweep['complete']} complete; K = {sweep['num_samples']}, NFE {sweep['nfe']} per sample).\n",
                  "| measure | value |", "|---|---|",
                  f"| once per sweep: checkpoint, feature network, cached reference | {sweep['setup_seconds']:.1f} s |",
                  f"| median seconds per trial | {sweep['median_trial_seconds']:.1f} s |",
                  f"| trials per hour on this machine | {sweep['trials_per_hour']:.0f} |", ""]
    lines += ["## FID memory (target: flat in K)\n",
              "One evaluation (one setting, Euler 2 steps, the default model) in a fresh process; peak resident memory.\n",
              "| K | peak RSS (GiB) | growth during the evaluation (MiB) | seconds |", "|---|---|---|---|"]
    lines += [f"| {m['num_samples']:,} | {m['peak_rss_gib']:.2f} | {m['growth_mib']:.0f} | {m['seconds']:.1f} |"
              for m in memory]
    lines += [""]
    lines += data + PARTS["terms"](args) + PARTS["st"](args) + PARTS["lightningdit"](args) + PARTS["moments"](args)
    lines += PARTS["cli"](args)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"exit_head": overhead, "sampling": sampling, "default_run": run, "fid_memory": memory,
                      "sampling_sweep": sweep}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
