"""What each loss term costs (issue 11), as plain functions for `igdit.bench` to call, and ``sections(...)``.

* ``digits_step_costs``: every digits experiment of a term against the plain diffusion loss, each trained for a
  few steps through Lightning's own fit loop (the EMA callback, the datamodule, the terms' frozen encoders and
  teachers set up exactly as in training); the median step time (forward, backward, optimiser, EMA update),
  the median over interleaved rounds of its ratio to the plain step, and the FLOPs one step actually runs
  (``torch.utils.flop_counter``, frozen networks included) against the plain step's.
* ``paper_scale_extra_flops``: the networks a term runs besides the student, per training sample at 256 px,
  against one forward of the student, counted on the meta device: the SRA / Self-Transcendence teachers (which
  stop at their block), DINOv2-B/14 and the SD-VAE decoder that REPA needs for its clean images.

Timings on a shared machine are noisy: arms are interleaved over rounds and medians of per-round ratios are
reported.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from igdit.bench import measured_on

# Arm name -> (experiment YAML, extra CLI arguments). "plain" is the reference every ratio is taken against.
PLAIN = ("experiments/default.yaml", ["--model.backbone.exits", "[]",
                                      "--model.terms", '{"diffusion": {"class_path": "igdit.objectives.DiffusionLoss"}}'])
DIGITS_ARMS: dict[str, tuple[str, list[str]]] = {
    "plain": PLAIN,
    "ig_exit (IG exit head + exit loss)": ("experiments/default.yaml", []),
    "repa": ("experiments/repa_digits.yaml", []),
    "sra": ("experiments/sra_digits.yaml", []),
    "layersync": ("experiments/layersync_digits.yaml", []),
    "dispersive": ("experiments/dispersive_digits.yaml", []),
    "ig_accel (replaces the diffusion loss)": ("experiments/ig_accel_digits.yaml", []),
    "st stage 1 (vae_align)": ("experiments/st_stage1_digits.yaml", []),
    # while the guide is on (the first stop_step steps); its teacher: a checkpoint of stage 1, made by the bench
    "st stage 2 (self_guided)": ("experiments/st_stage2_digits.yaml", ["--model.terms.self_guided.teacher_ckpt",
                                                                      "{stage1_checkpoint}"]),
}
STAGE1 = "experiments/st_stage1_digits.yaml"


class _StepTimer(pl.Callback):
    """Wall time of every training batch, from its start to the end of the last callback's batch-end hook."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds.append(time.perf_counter() - self._start)


def _fit(config: str, extra: list[str], data_root: str, scratch: Path, steps: int):
    """Train `steps` steps of an experiment in this process (no logger, no validation, no callbacks but the EMA);
    the trained CLI objects and the step times after two warm-up steps."""
    from igdit.experiment import run_lightning_cli

    ema = [c for c in yaml.safe_load(Path(config).read_text())["trainer"].get("callbacks", [])
           if c["class_path"].endswith("EMAWeightAveraging")]
    cli = run_lightning_cli(["--config", config, "--data.root", data_root, *extra, "--trainer.callbacks", json.dumps(ema),
                             "--trainer.max_steps", str(steps), "--trainer.logger", "false",
                             "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
                             "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(scratch)],
                            run=False)
    timer = _StepTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, weights_only=True)
    return cli, timer.seconds[2:]


def step_flops(module, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one training step's loss on (x, y) (every term, frozen networks included) and its backward.

    Attention runs on its math path while counting: the flop counter has no formula for the fused CPU kernel
    and would count attention as free."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        loss, _ = module.compute_loss(x, y, module.global_step)
        loss.backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def digits_step_costs(data_root: str, arms: Optional[dict] = None, rounds: int = 3, steps: int = 25) -> dict:
    """Per arm: median step ms, median over rounds of (arm step / plain step), FLOPs per step and their ratio."""
    arms = arms or DIGITS_ARMS
    times: dict[str, list[float]] = {name: [] for name in arms}
    flops: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="igdit-bench-terms-") as scratch:
        _fit(*arms["plain"], data_root, Path(scratch) / "warm-up", 4)  # first-use costs (threads, allocator) go here
        teacher = Path(scratch) / "stage1.ckpt"  # its weights do not change what a step costs
        _fit(STAGE1, [], data_root, Path(scratch) / "stage1", 2)[0].trainer.save_checkpoint(teacher)
        arms = {name: (config, [a.replace("{stage1_checkpoint}", str(teacher)) for a in extra])
                for name, (config, extra) in arms.items()}
        for round_ in range(rounds):
            for name, (config, extra) in arms.items():
                cli, seconds = _fit(config, extra, data_root, Path(scratch) / f"{round_}-{len(flops)}", steps)
                times[name].append(statistics.median(seconds))
                if name not in flops:
                    flops[name] = step_flops(cli.model, *next(iter(cli.datamodule.train_dataloader())))
    plain = times["plain"]
    return {"rounds": rounds, "steps": steps, "arms": {
        name: {"step_ms": 1000 * statistics.median(t),
               "time_ratio": statistics.median(a / b for a, b in zip(t, plain)),
               "gflops": flops[name] / 1e9, "flops_ratio": flops[name] / flops["plain"]}
        for name, t in times.items()}}


def _sit_flops(size: str, **forward) -> int:
    from lightning.fabric.utilities.throughput import measure_flops

    from igdit.models import SiT

    with torch.device("meta"):
        model = SiT(size, input_size=32, in_channels=4, num_classes=1000)
        x, t, y = torch.empty(1, 4, 32, 32), torch.empty(1), torch.zeros(1, dtype=torch.long)
    return measure_flops(model, lambda: model(x, t, y, **forward))


def paper_scale_extra_flops(teacher_blocks: dict[str, dict[str, int]] | None = None) -> dict:
    """GFLOPs per training sample of each term's extra networks at 256 px (4x32x32 SD-VAE latents), against one
    student forward. teacher_blocks: {term: {size: block its teacher stops after, or (block, passes)}} (SRA: 8 of
    B/2's 12 and 20 of XL/2's 28, docs/method.md §12.2; ST: 8 and 19, two passes for feature CFG)."""
    teacher_blocks = teacher_blocks or {
        "sra teacher (EMA, stops after its block)": {"B/2": 8, "XL/2": 20},
        # two passes (conditional and null label) per sample whose t is in [0.4, 0.7], while the guide is on
        "self-transcendence teacher, per guided sample (2 passes, stop after block m)": {"B/2": (8, 2),
                                                                                         "XL/2": (19, 2)}}
    forward = {size: _sit_flops(size) for size in ("B/2", "XL/2")}
    rows = {}
    for name, blocks in teacher_blocks.items():
        rows[name] = {}
        for size, block in blocks.items():
            block, passes = block if isinstance(block, tuple) else (block, 1)
            rows[name][size] = passes * _sit_flops(size, hidden=(block,), stop_after=block)
    encoders = {"dinov2 ViT-B/14 at 224 px (REPA)": _dinov2_flops(), "SD-VAE decoder, 32x32x4 -> 256x256 (REPA's "
                "clean images from latent shards)": _sd_vae_decoder_flops()}
    for name, value in encoders.items():
        rows[name] = {size: value for size in forward}
    return {"forward_gflops": {s: f / 1e9 for s, f in forward.items()},
            "rows": {name: {s: {"gflops": f / 1e9, "of_forward": f / forward[s]} for s, f in sizes.items()}
                     for name, sizes in rows.items()}}


def _dinov2_flops() -> int:
    import timm
    from lightning.fabric.utilities.throughput import measure_flops

    with torch.device("meta"):
        model = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=224)
        x = torch.empty(1, 3, 224, 224)
    return measure_flops(model, lambda: model.forward_features(x))


def _sd_vae_decoder_flops() -> int:
    from diffusers import AutoencoderKL
    from lightning.fabric.utilities.throughput import measure_flops

    with torch.device("meta"):  # SD-VAE's architecture (stabilityai/sd-vae-ft-ema config.json), no weights
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=256,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        z = torch.empty(1, 4, 32, 32)
    return measure_flops(vae, lambda: vae.decode(z).sample)


def sections(digits: dict, paper: dict) -> list[str]:
    """The report's section (starts with '## ')."""
    lines = ["## Loss terms (target: each term's cost measured against the plain diffusion loss)\n",
             f"Digits experiments (SiT-T/2, batch 128) trained through Lightning's fit loop with their EMA, data and "
             f"frozen networks; {digits['steps']} steps per fit (the first two not timed), {digits['rounds']} "
             "interleaved rounds: median step time and median of the per-round ratios to `plain` (no exit head, "
             "the diffusion loss alone). FLOPs: one step's loss and backward pass, frozen encoders and teachers "
             "included, counted by `torch.utils.flop_counter` (matrix products and convolutions; element-wise work "
             "such as LayerSync's cosines counts as free).\n",
             "| arm | step (ms) | time ratio | GFLOPs / step | FLOPs ratio |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {a['step_ms']:.1f} | {a['time_ratio']:.3f} | {a['gflops']:.2f} | {a['flops_ratio']:.3f} |"
              for name, a in digits["arms"].items()]
    sizes = list(paper["forward_gflops"])
    lines += ["", "At paper scale (256 px, per training sample, counted on the meta device): what each term runs "
              "besides the student, against one student forward ("
              + ", ".join(f"SiT-{s} {g:.1f} GFLOPs" for s, g in paper["forward_gflops"].items()) + "; FLOPs = 2 x "
              "multiply-adds).\n",
              "| extra network | " + " | ".join(f"SiT-{s}: GFLOPs (x forward)" for s in sizes) + " |",
              "|---|" + "---|" * len(sizes)]
    lines += [f"| {name} | " + " | ".join(f"{r[s]['gflops']:.1f} ({r[s]['of_forward']:.2f})" for s in sizes) + " |"
              for name, r in paper["rows"].items()]
    return lines + [""]


# ---- Self-Transcendence's teacher: which samples it sees, and in what precision -----------------------------
ST_STAGE2 = "experiments/st_stage2_digits.yaml"
# (t_range_mode, teacher_precision, trainer precision) of each timed variant of stage 2
ST_VARIANTS = {"per_sample, teacher float32, 32-true": ("per_sample", "float32", "32-true"),
               "official_broadcast, teacher float32, 32-true": ("official_broadcast", "float32", "32-true"),
               "official_broadcast, teacher float32, bf16-mixed": ("official_broadcast", "float32", "bf16-mixed"),
               "official_broadcast, teacher in the trainer's bf16, bf16-mixed": ("official_broadcast", "trainer",
                                                                                 "bf16-mixed")}
# The public ST code's t-range is [0.4, 0.7] of uniform t: the in-range fraction of a batch is 0.3 on average.
ST_IN_RANGE = 0.3


def st_teacher_costs(data_root: str, rounds: int = 3, steps: int = 20) -> dict:
    """ST stage 2 while the guide is on, on the digits (SiT-T/2, batch 128): median step ms of each ``ST_VARIANTS``
    entry and its median per-round ratio to the first (the term's default: per-sample t-range, float32 teacher),
    interleaved; and, at paper scale, the teacher's GFLOPs per training sample under each t-range mode against the
    student's training step (3 forwards)."""
    times: dict[str, list[float]] = {name: [] for name in ST_VARIANTS}
    measured = measured_on()
    with tempfile.TemporaryDirectory(prefix="igdit-bench-st-") as scratch:
        teacher = Path(scratch) / "stage1.ckpt"
        _fit(STAGE1, [], data_root, Path(scratch) / "stage1", 2)[0].trainer.save_checkpoint(teacher)
        for round_ in range(rounds):
            for i, (name, (mode, precision, trainer)) in enumerate(ST_VARIANTS.items()):
                extra = ["--model.terms.self_guided.teacher_ckpt", str(teacher),
                         "--model.terms.self_guided.t_range_mode", mode,
                         "--model.terms.self_guided.teacher_precision", precision, "--trainer.precision", trainer]
                _, seconds = _fit(ST_STAGE2, extra, data_root, Path(scratch) / f"{round_}-{i}", steps)
                times[name].append(statistics.median(seconds))
    first = times[next(iter(ST_VARIANTS))]
    digits = {name: {"step_ms": 1000 * statistics.median(t),
                     "ratio": statistics.median(a / b for a, b in zip(t, first))} for name, t in times.items()}
    paper = {}
    for size, block in (("B/2", 8), ("XL/2", 19)):
        forward, teacher = _sit_flops(size), 2 * _sit_flops(size, hidden=(block,), stop_after=block)
        paper[size] = {"student_step_gflops": 3 * forward / 1e9, "teacher_block": block,
                       "per_sample_gflops": ST_IN_RANGE * teacher / 1e9, "official_broadcast_gflops": teacher / 1e9}
    return {"measured": measured, "rounds": rounds, "steps": steps, "digits": digits, "paper": paper}


def st_sections(costs: dict) -> list[str]:
    """The report's section on the ST teacher (starts with '## ')."""
    lines = ["## Self-Transcendence teacher (target: the cost of the public code's t-range and of a float32 teacher)\n",
             (f"Measured {costs['measured']} by `python -m igdit.bench --only st`. " if "measured" in costs else "")
             + f"ST stage 2 on the digits while its guide is on (`{ST_STAGE2}`, SiT-T/2, batch 128, the teacher's "
             f"block 4 of 6), trained through Lightning's fit loop; {costs['steps']} steps per fit, the first two not "
             f"timed, {costs['rounds']} interleaved rounds; ratio to the first row, the term's default. Under "
             "`official_broadcast` the teacher runs on the whole batch; under `per_sample` on the ~30% inside "
             "[0.4, 0.7]. bf16 autocast on a CPU is not what a GPU's tensor cores do, so the precision rows say "
             "what the switch costs here, not on a GPU.\n",
             "| variant (t_range_mode, teacher precision, trainer precision) | step (ms) | ratio |", "|---|---|---|"]
    lines += [f"| {name} | {v['step_ms']:.1f} | {v['ratio']:.3f} |" for name, v in costs["digits"].items()]
    lines += ["", "At paper scale (256 px, per training sample while the guide is on): the teacher's two passes "
              "(conditional and null label) to its block, counted on the meta device, against the student's "
              "training step (3 forwards). FLOPs do not depend on the precision; a float32 teacher runs them at "
              "the device's float32 (or TF32) rate instead of its bf16 rate (H100 SXM dense: bf16 989, TF32 495 "
              "TFLOPS, NVIDIA's datasheet), i.e. about 2x the time of the same FLOPs in bf16 with TF32 on.\n",
              "| model (teacher block) | student step GFLOPs | teacher, per_sample (x0.3 of samples) | teacher, "
              "official_broadcast (every sample) |", "|---|---|---|---|"]
    for size, p in costs["paper"].items():
        step = p["student_step_gflops"]
        lines.append(f"| SiT-{size} ({p['teacher_block']}) | {step:.0f} | {p['per_sample_gflops']:.0f} "
                     f"(+{p['per_sample_gflops'] / step:.0%}) | {p['official_broadcast_gflops']:.0f} "
                     f"(+{p['official_broadcast_gflops'] / step:.0%}) |")
    return lines + [""]
