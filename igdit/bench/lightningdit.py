"""Benchmarks of issue 12, as plain functions for `igdit.bench` to call, and ``sections(...)`` for its report.

Targets: LightningDiT-XL/1 + IG sampling on the shifted Heun schedule (the published sampler: 124 Heun steps,
248 NFE) costs no extra forward pass and at most 3% more wall time with IG than without (IG/none <= 1.03);
streaming posterior shards (VA-VAE-shaped 32x16x16 mean and std, a fresh draw at every read) keeps far ahead of
what LightningDiT-XL/1 training consumes per GPU.

    python -m igdit.bench.lightningdit --device cuda               # XL/1, batch 64, the full 124-step schedule
    python -m igdit.bench.lightningdit --size T/1 --steps 4 --batch 8   # a quick look on a CPU

Timings on a shared machine are noisy: settings are interleaved over rounds and medians are reported. This
module does not import ``igdit.bench.core`` (core imports this one); its GPU-throughput assumption is the same.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

ASSUMED_GPU_TFLOPS = 989 * 0.5  # an H100's dense bf16 peak at 50% utilisation, as igdit.bench assumes
VAVAE_LATENT = (32, 16, 16)
PRESET = "lightningdit-xl1-ig-cfg"


def _model(size: str, device: str, dtype: torch.dtype):
    """LightningDiT-<size> with the released exit (block 8, or the middle block of a smaller test size), random
    weights (cost does not depend on them; the zero-initialised final head is perturbed), on device, eval."""
    from igdit.models import LightningDiT

    torch.manual_seed(0)
    depth = LightningDiT.sizes[size]["depth"]
    model = LightningDiT(size, input_size=VAVAE_LATENT[1], in_channels=VAVAE_LATENT[0], num_classes=1000,
                         exits=[min(8, depth // 2)])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    return model.to(device=device, dtype=dtype).eval()


def exit_head_flops(size: str = "XL/1") -> dict:
    """Forward FLOPs of one image with and without the exit head (counted on the meta device)."""
    from lightning.fabric.utilities.throughput import measure_flops

    from igdit.models import LightningDiT

    depth = LightningDiT.sizes[size]["depth"]
    with torch.device("meta"):
        model = LightningDiT(size, input_size=VAVAE_LATENT[1], in_channels=VAVAE_LATENT[0], exits=[min(8, depth // 2)])
        x, t, y = torch.empty(1, *VAVAE_LATENT), torch.empty(1), torch.zeros(1, dtype=torch.long)
    exit_ = model.exit_indices[0]
    plain = measure_flops(model, lambda: model(x, t, y).final)
    with_exit = measure_flops(model, lambda: model(x, t, y, exits=[exit_]).final)
    return {"forward_gflops": plain / 1e9, "forward_gflops_with_exit": with_exit / 1e9, "ratio": with_exit / plain}


def sampling_throughput(size: str = "XL/1", batch: int = 64, steps: int = 124, rounds: int = 3,
                        device: Optional[str] = None) -> dict:
    """Images/s of LightningDiT-<size> + IG with the published sampler (Heun, shifted grid with shift 0.3, a full
    Heun last step, guidance decided at every evaluation) under each guidance setting, interleaved over
    ``rounds``: NFE per image, network rows per (NFE x batch) (2 where CFG doubles the batch), median seconds per
    batch, images/s, and the median over rounds of the wall-time ratio against no guidance.

    Settings: none; IG 1.7 at every step (the no-CFG preset); CFG 1.45 on t <= 0.81 alone; IG 1.4 + CFG 1.45
    (the CFG preset). The IG/none ratio is the target (<= 1.03): IG reads the exit head of the same pass.
    """
    from igdit.guidance import ClassifierFreeGuidance, Denoiser, InternalGuidance
    from igdit.presets import PRESETS
    from igdit.samplers import run_sampler
    from igdit.transport import Transport

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = _model(size, device, dtype)
    sampling = PRESETS[PRESET].sampling
    settings = {
        "none": [],
        "ig 1.7": [InternalGuidance(1.7)],
        "cfg 1.45 on [0, 0.81]": [ClassifierFreeGuidance(1.45, (0.0, 0.81))],
        "ig 1.4 + cfg 1.45 on [0, 0.81]": [InternalGuidance(1.4), ClassifierFreeGuidance(1.45, (0.0, 0.81))],
    }
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(batch, *VAVAE_LATENT, generator=g).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=g).to(device)

    def run(rules) -> tuple[float, int, float]:
        denoiser = Denoiser(model, rules)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            _, nfe = run_sampler(sampling.sampler, denoiser, Transport(), noise, labels, steps, model_dtype=dtype,
                                 schedule=sampling.schedule, shift=sampling.shift,
                                 heun_last_step=sampling.heun_last_step, decide=sampling.heun_decide)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, nfe, denoiser.network_rows / (nfe * batch)

    run(settings["ig 1.4 + cfg 1.45 on [0, 0.81]"])  # warm-up (kernels, allocator)
    times = {name: [] for name in settings}
    counts = {}
    for _ in range(rounds):
        for name, rules in settings.items():
            seconds, nfe, rows = run(rules)
            times[name].append(seconds)
            counts[name] = (nfe, rows)
    base = times["none"]
    results = {name: {"nfe": counts[name][0], "rows_ratio": counts[name][1], "seconds": statistics.median(t),
                      "images_per_sec": batch / statistics.median(t),
                      "time_ratio": statistics.median(a / b for a, b in zip(t, base))} for name, t in times.items()}
    return {"settings": results, "size": size, "batch": batch, "steps": steps, "rounds": rounds, "device": device,
            "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
            "dtype": str(dtype).replace("torch.", ""), "flops": exit_head_flops(size)}


def _shards(root: Path, samples: int, per_shard: int, shape: tuple, posterior: bool, dtype: str = "float16") -> Path:
    """Train shards of random latents in the build's layout (posterior: mean.npy + std.npy in ``dtype``, else
    latent.npy in float16) and the meta.json fields LatentDataModule reads; one val shard."""
    import numpy as np
    import webdataset as wds

    from igdit.data.shards import FORMAT_VERSION

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    counts = {"train": [], "val": []}
    for split, total in (("train", samples), ("val", per_shard)):
        for index in range(math.ceil(total / per_shard)):
            n = min(per_shard, total - index * per_shard)
            with wds.TarWriter(str(root / f"{split}-{index:06d}.tar")) as sink:
                for i in range(n):
                    arrays = ({"mean.npy": rng.standard_normal(shape).astype(dtype),
                               "std.npy": (0.1 * rng.random(shape)).astype(dtype)} if posterior
                              else {"latent.npy": rng.standard_normal(shape).astype(np.float16)})
                    sink.write({"__key__": f"{index * per_shard + i:08d}", **arrays, "cls": int(i % 1000)})
            counts[split].append(n)
    meta = {"format_version": FORMAT_VERSION, "latent_shape": list(shape), "num_classes": 1000,
            "encoder": {"name": "benchmark"}, "normalizer": {"shift": [0.0] * shape[0], "scale": [1.0] * shape[0]},
            "num_samples": {s: sum(c) for s, c in counts.items()}, "num_shards": {s: len(c) for s, c in counts.items()},
            "shard_samples": counts, "latent_format": "posterior" if posterior else "sample",
            "dtype": dtype if posterior else "float16"}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def _stream(root: Path, workers: int, batch: int, batches: int) -> float:
    from igdit.data import LatentDataModule

    dm = LatentDataModule(str(root), batch_size=batch, num_workers=workers, shuffle_buffer=5_000,
                          steps_per_epoch=10**6)
    dm.setup("fit")
    iterator = iter(dm.train_dataloader())
    for _ in range(2 * max(1, workers)):  # warm-up: workers started, shuffle buffers filled
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    if workers:
        del iterator  # its DataLoader workers shut down with it
    return batches * batch / seconds


def posterior_streaming(workers=(1, 2), batch: int = 256, batches: int = 60, samples: int = 12_000,
                        per_shard: int = 1000, rounds: int = 3, shape: tuple = VAVAE_LATENT) -> dict:
    """Samples/s LatentDataModule delivers through a real DataLoader (one rank) from posterior shards (a fresh
    draw x = mean + std eps at every read) and, for comparison, from single-draw shards of the same shape;
    medians of ``rounds`` interleaved runs per worker count. Also the LightningDiT-XL/1 training consumption
    bound per GPU: ASSUMED_GPU_TFLOPS / (3 x forward FLOPs per image)."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="igdit-bench-posterior-") as scratch:
        roots = {fmt: _shards(Path(scratch) / fmt, samples, per_shard, shape, fmt == "posterior")
                 for fmt in ("posterior", "sample")}
        rates = {(fmt, n): [] for fmt in roots for n in workers}
        for _ in range(rounds):
            for fmt, n in rates:
                rates[(fmt, n)].append(_stream(roots[fmt], n, batch, batches))
        shard_mib = {fmt: (root / "train-000000.tar").stat().st_size / 2**20 for fmt, root in roots.items()}
    for (fmt, n), r in rates.items():
        results.setdefault(fmt, {})[n] = {"samples_per_sec": statistics.median(r),
                                          "per_worker": statistics.median(r) / max(1, n),  # 0: the main process
                                          "min": min(r), "max": max(r)}
    forward = exit_head_flops("XL/1")["forward_gflops_with_exit"]
    bound = ASSUMED_GPU_TFLOPS * 1e12 / (3 * forward * 1e9)
    return {"formats": results, "batch": batch, "batches": batches, "samples": samples, "per_shard": per_shard,
            "shape": tuple(shape), "rounds": rounds, "shard_mib": shard_mib, "consumption_per_gpu": bound,
            "forward_gflops": forward}


def sections(sampling: dict, streaming: dict, sit_bound: Optional[float] = None) -> list[str]:
    """The report's sections (each starts with '## ') from ``sampling_throughput`` and ``posterior_streaming``.

    sit_bound: the SiT-XL/2 per-GPU consumption figure the data section already reports
    (``igdit.bench.core.SIT_XL2_SAMPLES_PER_GPU``), to set the posterior rate against it as well.
    """
    s = sampling["settings"]
    ig, flops = s["ig 1.7"], sampling["flops"]
    lines = [
        f"## LightningDiT-{sampling['size']} + IG sampling (target: IG adds no forward pass, IG/none wall time <= 1.03)\n",
        f"Preset `{PRESET}`'s sampler: Heun on the shifted grid (shift 0.3), {sampling['steps']} steps with a full "
        f"Heun last step, guidance decided at every evaluation; random weights (cost does not depend on them), "
        f"batch {sampling['batch']}, {sampling['dtype']} on {sampling['device_name']}; {sampling['rounds']} "
        "interleaved rounds, medians; ratios against no guidance.\n",
        "| guidance | NFE / image | network rows / (NFE x batch) | s / batch | images/s | time ratio |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {name} | {r['nfe']} | {r['rows_ratio']:.2f} | {r['seconds']:.2f} | {r['images_per_sec']:.1f} | "
              f"{r['time_ratio']:.3f} |" for name, r in s.items()]
    lines += [f"\nIG/none: **{ig['time_ratio']:.3f}** with the same NFE ({ig['nfe']}) and rows; the exit head adds "
              f"{100 * (flops['ratio'] - 1):.2f}% of a forward pass's FLOPs ({flops['forward_gflops']:.1f} -> "
              f"{flops['forward_gflops_with_exit']:.1f} GFLOPs per image, counted on the meta device). CFG on "
              "[0, 0.81] doubles the batch on the steps inside its interval only.\n"]
    p, one = streaming["formats"]["posterior"], streaming["formats"]["sample"]
    bound, shape = streaming["consumption_per_gpu"], "x".join(map(str, streaming["shape"]))
    workers = sorted(p)
    lines += [
        "## Streaming posterior latents (target: far above what LightningDiT-XL/1 training consumes per GPU)\n",
        f"`LatentDataModule` through a real DataLoader, one rank: {streaming['samples']:,} random {shape} float16 "
        f"samples in shards of {streaming['per_shard']} ({streaming['shard_mib']['posterior']:.1f} MiB posterior, "
        f"{streaming['shard_mib']['sample']:.1f} MiB single draw), batches of {streaming['batch']}, "
        f"{streaming['batches']} batches timed after warm-up; median of {streaming['rounds']} interleaved rounds "
        "(min-max). Posterior: mean.npy + std.npy per sample and a fresh draw x = mean + std eps at every read; "
        "single draw: latent.npy.\n",
        "| DataLoader workers | posterior samples/s | per worker | single-draw samples/s | posterior / single |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {p[n]['samples_per_sec']:,.0f} ({p[n]['min']:,.0f}-{p[n]['max']:,.0f}) | "
              f"{p[n]['per_worker']:,.0f} | {one[n]['samples_per_sec']:,.0f} | "
              f"{p[n]['samples_per_sec'] / one[n]['samples_per_sec']:.2f} |" for n in workers]
    lines += [f"\nLightningDiT-XL/1 consumption assumed per GPU: **{bound:,.0f} samples/s**, an upper bound: "
              f"{streaming['forward_gflops']:.1f} GFLOPs per image forward (with the exit head, counted on the meta "
              f"device; FLOPs = 2 x multiply-adds, where the DiT paper's 118.6 'GFLOPs' for SiT-XL/2 count "
              f"multiply-adds) x 3 for forward + backward at {ASSUMED_GPU_TFLOPS:.0f} TFLOP/s (50% of an H100's dense "
              f"bf16 peak). One worker streams **{p[workers[0]]['per_worker'] / bound:.1f}x** that; 8 workers per GPU at "
              f"this per-worker rate ~{8 * p[workers[0]]['per_worker'] / bound:.0f}x."]
    if sit_bound:
        lines[-1] += (f" Against the SiT-XL/2 figure of the streaming section ({sit_bound:,.0f} samples/s, from "
                      f"multiply-adds, so twice this one's for the same compute): "
                      f"**{p[workers[0]]['per_worker'] / sit_bound:.1f}x** per worker.")
    lines[-1] += "\n"
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="XL/1")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=124)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--samples", type=int, default=12_000, help="posterior samples to stream")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    sampling = sampling_throughput(args.size, args.batch, args.steps, args.rounds, args.device)
    streaming = posterior_streaming(samples=args.samples)
    print("\n".join(sections(sampling, streaming)))
    print(json.dumps({"sampling": sampling, "streaming": streaming}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
