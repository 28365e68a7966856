"""`make bench-gpu` (``python -m igdit.bench --gpu``): paper-scale training, sampling, FID during training and data
streaming on one accelerator, side by side in one run of under 8 minutes on an H100/H200, written into
BENCHMARKS.md as its "GPU benchmark" section.

Targets (measured here, never asserted in a timed test): SiT-XL/2 + IG in bf16-mixed + torch.compile trains at
>= 50% MFU; the exit head costs <= 1% of a training step; IG sampling adds no forward pass and <= 3% wall time;
one FID-10k evaluation costs <= 10% of the training time between two at the paper's schedule; posterior-shard
streaming with the paper configs' DataLoader workers delivers >= 5x what one GPU consumes.

Every model comes from the paper YAMLs' ``model:`` sections through ``build_module``; every step is the one
Lightning's fit loop runs for igdit (``compute_loss`` under the precision plugin's autocast, backward, the YAML's
gradient-norm clip, the YAML's optimiser, the EMA update of ``EMAWeightAveraging``), sampling is
``igdit.generation.image_batches`` with the published presets' sampler and guidance, decoding is
``decode_latents`` through a VAE of the real architecture (random weights: cost does not depend on them).
Training data are random latents already on the device; the data section measures the loader on its own.

    python -m igdit.bench --gpu                       # on a GPU: the whole run, <= --budget seconds (420)
    python -m igdit.bench --gpu --device cpu --tiny   # a CPU check of this script: tiny models, seconds

A time budget bounds the whole run: every measurement has its own (seconds of timed steps after warm-up), and a
measurement that no longer fits in what is left is skipped and named in the report, so the run ends in time
whatever the machine. Progress goes to stdout, one line per measurement.
"""
from __future__ import annotations

import copy
import gc
import math
import os
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

# name -> (paper YAML, preset of its published sampler)
MODELS = {
    "SiT-XL/2 + IG": ("experiments/sit_xl2_ig.yaml", "sit-xl2-ig-cfg"),
    "LightningDiT-XL/1 + IG": ("experiments/lightningdit_xl1_ig.yaml", "lightningdit-xl1-ig-cfg"),
}
# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) from the vendor's data sheets; the first match of the device
# name wins, so the PCIe H100 comes before the SXM one.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
# --tiny: the paper YAMLs' model sections with these backbone overrides (and a small latent side), so that the
# whole script runs on a CPU in seconds.
TINY_BACKBONE = {"depth": 2, "hidden_size": 32, "num_heads": 2, "exits": [1]}
TINY_INPUT_SIZE = {"igdit.models.SiT": 8, "igdit.models.LightningDiT": 4}
# A random VAE of the real architecture for decoding (diffusers AutoencoderKL configs): SD-VAE ft-EMA's
# config.json, and VA-VAE f16d32 as igdit.data.ldm_vae converts it (tests/test_vavae.py checks that layout).
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
              latent_channels=4, norm_num_groups=32, sample_size=256, scaling_factor=0.18215)
VA_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"],
              up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 4,
              block_out_channels=[128, 128, 256, 256, 512], layers_per_block=2, latent_channels=32, norm_num_groups=32,
              sample_size=256, scaling_factor=1.0, mid_block_add_attention=True)
VAES = {4: ("sd-vae-ft-ema", SD_VAE), 32: ("vavae-f16d32", VA_VAE)}  # by latent channels
# --tiny decodes through a tiny AutoencoderKL (the tests' tiny_vae) with the model's latent channels
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                norm_num_groups=4, sample_size=16)
MODES = ("fp32", "fp32 + TF32", "bf16-mixed", "bf16-mixed, fused AdamW", "bf16-mixed + compile")  # report order
FID_RUN_IMAGES = 50_000
FID_RUN_GPUS = 8


def peak_tflops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of a known accelerator (``PEAK_BF16_TFLOPS``), None for any other device."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key.lower() in device_name.lower()), None)


def mfu(flops_per_item: float, items_per_sec: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation: FLOPs per item x items/s over the peak (TFLOP/s); None when the peak is unknown."""
    return None if not peak else flops_per_item * items_per_sec / (peak * 1e12)


@dataclass
class Plan:
    """Sizes and time budgets of one run. measure_s: timed seconds per training point after warm-up (at least
    min_steps steps); sampling_s: the longest sampler run measured in full (longer ones are timed on fewer steps
    and scaled by steps); batch: the paper's per-GPU batch (global 256 on 8 GPUs)."""

    device: str
    tiny: bool = False
    budget_s: float = 420.0  # measurements; imports and the report come on top, the whole under 8 minutes
    batch: int = 32
    batch_cap: int = 4096
    warmup: int = 2
    min_steps: int = 3
    measure_s: float = 2.0
    exit_rounds: int = 6
    ig_rounds: int = 4  # interleaved rounds of IG against no guidance
    sampling_batch: int = 64
    sampling_s: float = 20.0
    short_steps: dict = field(default_factory=lambda: {"sde": 10, "heun": 5, "euler": 10})
    fid_batch: Optional[int] = None  # None: the FIDCallback's own batch_size
    stream_samples: int = 4_000
    stream_batches: int = 40
    stream_workers: Optional[int] = None  # None: the paper YAMLs' data.num_workers where the cores allow
    compile_largest: bool = True  # tier 2 compiles again at bf16's largest batch (the CPU check leaves it out)

    @classmethod
    def tiny_cpu(cls, device: str = "cpu", budget_s: float = 300.0) -> "Plan":
        return cls(device=device, tiny=True, budget_s=budget_s, batch=2, batch_cap=8, warmup=1, min_steps=2,
                   measure_s=0.0, exit_rounds=1, ig_rounds=1, sampling_batch=2, sampling_s=0.0,
                   short_steps={"sde": 2, "heun": 1, "euler": 1}, fid_batch=2, stream_samples=400, stream_batches=4,
                   stream_workers=1, compile_largest=False)


class Budget:
    """The run's clock: seconds since the start, what is left, and progress lines."""

    def __init__(self, seconds: float, echo: Callable[[str], None] = print):
        self.seconds, self.start, self.echo = seconds, time.perf_counter(), echo
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, what: str, need: float) -> bool:
        """Whether ``need`` seconds are left for ``what``; if not, it is recorded as skipped."""
        if self.left() >= need:
            return True
        self.skipped.append(f"{what} (needs ~{need:.0f} s, {max(self.left(), 0):.0f} s left)")
        self.log(f"skipped: {self.skipped[-1]}")
        return False

    def log(self, message: str) -> None:
        self.echo(f"[{self.elapsed():5.0f} s] {message}")


# ---- device helpers ---------------------------------------------------------------------------------------
def _cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def _sync(device: str) -> None:
    if _cuda(device):
        torch.cuda.synchronize(device)


def _free(device: str) -> None:
    gc.collect()
    if _cuda(device):
        torch.cuda.empty_cache()


def _reset_peak(device: str) -> None:
    if _cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: str) -> float:
    """Peak memory since the last reset: CUDA's allocated peak on a GPU, the process's peak RSS on a CPU."""
    if _cuda(device):
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Clock:
    """Marks inside a step without synchronising: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device: str):
        self.cuda = _cuda(device)

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000 if self.cuda else b - a


def environment(device: str) -> dict:
    """The device, software versions and the peak the MFU figures are taken against."""
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}
    if _cuda(device):
        props = torch.cuda.get_device_properties(device)
        info |= {"name": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                 "cudnn": torch.backends.cudnn.version(), "memory_gib": props.total_memory / 2**30,
                 "capability": f"{props.major}.{props.minor}"}
    else:
        info |= {"name": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                 "cuda": None, "cudnn": None, "memory_gib": None}
    info["peak_tflops"] = peak_tflops(info["name"]) if _cuda(device) else None
    return info


# ---- models -----------------------------------------------------------------------------------------------
def _config_path(config: str) -> Path:
    """An experiment YAML as given, else relative to the checkout this package runs from (the paper YAMLs live in
    its experiments/ folder, whatever the working directory)."""
    path = Path(config)
    return path if path.is_file() or path.is_absolute() else Path(__file__).resolve().parents[2] / config


def paper_model(config: str, tiny: bool = False, exit_head: bool = True) -> dict:
    """The ``model:`` section of a paper YAML (compile off: the benchmark compiles where it measures compile).
    tiny: the TINY_BACKBONE overrides. exit_head False: the same model without exit heads and without the exit
    loss (every other term kept), to price the exit head."""
    model = copy.deepcopy(yaml.safe_load(_config_path(config).read_text())["model"])
    model["compile"] = False
    backbone = model["backbone"]["init_args"]
    if tiny:
        backbone.update(TINY_BACKBONE, input_size=TINY_INPUT_SIZE[model["backbone"]["class_path"]])
    if not exit_head:
        backbone["exits"] = []
        model["terms"] = {name: term for name, term in model["terms"].items()
                          if not term["class_path"].endswith("ExitLoss")}
    return model


def build(model_args: dict, device: str):
    """build_module on ``device``, initialised there where possible (an XL model in a second, not in a minute on
    the host)."""
    from igdit.module import build_module

    try:
        with torch.device(device):
            module = build_module(model_args)
    except (RuntimeError, NotImplementedError):  # an initialiser without a kernel on the device: build on the host
        module = build_module(model_args).to(device)
    return module


def forward_flops(module, exits: tuple = ()) -> int:
    """FLOPs of one forward pass of one sample with ``exits``, counted on the meta device."""
    from lightning.fabric.utilities.throughput import measure_flops

    from igdit.config import instantiate
    from igdit.models import Backbone

    with torch.device("meta"):
        model = instantiate(Backbone, module.hparams["backbone"])
        x, t = torch.empty(1, *module.latent_shape), torch.empty(1)
        y = torch.zeros(1, dtype=torch.long)
    return measure_flops(model, lambda: model(x, t, y, exits=exits).final)


# ---- training ---------------------------------------------------------------------------------------------
class TrainingStep:
    """One training step as Lightning's fit loop runs it for igdit: label dropout and ``compute_loss`` under the
    precision plugin's autocast (bf16-mixed: ``torch.autocast(bfloat16, cache_enabled=False)``), the training
    step's finite-loss check, backward, gradient-norm clipping (``gradient_clip_val``), the optimiser step, zeroed
    gradients, then the EMA update of ``EMAWeightAveraging`` (torch's AveragedModel with the EMA avg_fn)."""

    def __init__(self, module, optimizer, bf16: bool, clip: float, ema):
        self.module, self.optimizer, self.bf16, self.clip, self.ema = module, optimizer, bf16, clip, ema
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.device_type = next(module.parameters()).device.type

    def __call__(self, x, y, clock: Optional[Clock] = None) -> list:
        module = self.module
        marks = [clock.mark()] if clock else []
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            loss, _ = module.compute_loss(x, module.drop_labels(y, module.train_generator), 0,
                                          module.train_generator, y_clean=y)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()} in the benchmark step")
        loss.backward()
        marks += [clock.mark()] if clock else []
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        marks += [clock.mark()] if clock else []
        if self.ema is not None:
            self.ema.update_parameters(module)
        marks += [clock.mark()] if clock else []
        return marks


def newton_schulz_flops(optimizer) -> int:
    """FLOPs of one step's Newton-Schulz iterations in igdit.optim.MuonWithAuxAdam (0 for other optimisers): per
    iteration on an a x b matrix (a <= b), X X^T, A A and B X: 2 (2 a^2 b + a^3). Not model FLOPs: MFU leaves
    them out."""
    total = 0
    for group in optimizer.param_groups:
        if not group.get("use_muon"):
            continue
        for p in group["params"]:
            a, b = sorted((p.shape[0], p.numel() // p.shape[0]))
            total += group["ns_steps"] * 2 * (2 * a * a * b + a ** 3)
    return total


def _ema(module, decay: float):
    from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

    return AveragedModel(module, use_buffers=True, avg_fn=get_ema_avg_fn(decay))


def _yaml_training(config: str) -> dict:
    """The trainer settings a training step depends on: gradient clip, EMA decay, per-GPU batch."""
    full = yaml.safe_load(_config_path(config).read_text())
    trainer = full["trainer"]
    ema = next((c["init_args"].get("decay", 0.999) for c in trainer.get("callbacks", [])
                if c["class_path"].endswith("EMAWeightAveraging")), None)
    world = int(trainer.get("devices", 1)) * int(trainer.get("num_nodes", 1))
    return {"clip": float(trainer.get("gradient_clip_val") or 0.0), "ema_decay": ema, "world": world,
            "per_gpu_batch": int(full["data"]["batch_size"]) // world, "num_workers": int(full["data"]["num_workers"]),
            "precision": trainer.get("precision")}


def _batch(module, batch: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *module.latent_shape, generator=g).to(device)
    y = torch.randint(0, module.num_classes, (batch,), generator=g).to(device)
    return x, y


def time_steps(step: TrainingStep, batch: int, plan: Plan) -> dict:
    """Warm-up steps, then timed steps until plan.measure_s seconds and at least plan.min_steps: wall seconds per
    step, the medians of its parts (forward + backward, clip + optimiser, EMA) and the peak memory."""
    device = plan.device
    x, y = _batch(step.module, batch, device)
    _reset_peak(device)
    start = time.perf_counter()
    for _ in range(plan.warmup):
        step(x, y)
    _sync(device)
    warmup_s = time.perf_counter() - start
    clock, marks, steps = Clock(device), [], 0
    start = time.perf_counter()
    while steps < plan.min_steps or time.perf_counter() - start < plan.measure_s:
        marks.append(step(x, y, clock))
        steps += 1
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    part = lambda i: statistics.median(clock.seconds(m[i], m[i + 1]) for m in marks)  # noqa: E731
    return {"batch": batch, "steps": steps, "step_s": seconds, "samples_per_sec": batch / seconds,
            "fwd_bwd_s": part(0), "optimizer_s": part(1), "ema_s": part(2), "peak_gib": _peak_gib(device),
            "warmup_s": warmup_s}


def largest_batch(step: TrainingStep, start: int, plan: Plan, budget: Budget, what: str) -> tuple[int, bool]:
    """The largest batch start x 2^k (<= plan.batch_cap) whose training step runs without running out of device
    memory, doubling from ``start`` (which must fit). Returns (batch, whether the cap or the budget stopped it)."""
    fits, batch, last_s = start, start * 2, 1.0
    while batch <= plan.batch_cap:
        if not budget.allows(f"{what}: batch {batch} in the search", 6 * last_s + 5):
            return fits, True
        begin = time.perf_counter()
        if not _fits(step, batch, plan.device):
            budget.log(f"{what}: batch {batch} runs out of memory; largest: {fits}")
            return fits, False
        last_s = time.perf_counter() - begin
        fits, batch = batch, batch * 2
    return fits, True


def _fits(step: TrainingStep, batch: int, device: str) -> bool:
    """One training step at ``batch``; False when it runs out of device memory (its memory freed again)."""
    try:
        step(*_batch(step.module, batch, device))
        _sync(device)
        return True
    except torch.OutOfMemoryError:
        pass
    # outside the except clause: the traceback no longer holds the step's activations
    step.optimizer.zero_grad(set_to_none=True)
    _free(device)
    return False


OUT_OF_MEMORY = "out of device memory"


def _mode_setup(mode: str) -> Callable[[], None]:
    """Set the global fp32 matmul precision a mode asks for (TF32 or full fp32); returns the undo."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if "TF32" in mode else "highest")
    return lambda: torch.set_float32_matmul_precision(before)


class Trainee:
    """One paper model on the device with its optimiser and EMA copy, and the rows measured on it."""

    def __init__(self, name: str, config: str, plan: Plan, budget: Budget, peak: Optional[float]):
        self.name, self.config, self.plan, self.budget, self.peak = name, config, plan, budget, peak
        self.settings = _yaml_training(config)
        self.model_args = paper_model(config, plan.tiny)
        budget.log(f"{name}: building {self.model_args['backbone']['init_args'].get('size')} from {config}"
                   + (" (tiny backbone)" if plan.tiny else ""))
        self.module = build(self.model_args, plan.device)
        # EMAWeightAveraging copies the module in its setup, before IGDiTModule.setup seeds the generator and compiles
        self.ema = _ema(self.module, self.settings["ema_decay"]) if self.settings["ema_decay"] else None
        self.module.train_generator = torch.Generator(device=plan.device).manual_seed(0)
        optimizer = self.module.configure_optimizers()
        self.optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
        self.flops = self.module.training_flops(1)
        self.optimizer_flops = newton_schulz_flops(self.optimizer)
        self.tokens = self.module.backbone.grid_size ** 2
        self.params = sum(p.numel() for p in self.module.parameters())
        self.rows: list[dict] = []
        self.prior: list[dict] = []  # rows measured on an earlier build of the same model
        self.last_failure: Optional[str] = None
        self.notes: list[str] = []

    def step(self, bf16: bool, optimizer=None) -> TrainingStep:
        return TrainingStep(self.module, optimizer or self.optimizer, bf16, self.settings["clip"], self.ema)

    def estimate(self, batch: int, slower: float = 1.0) -> float:
        """Seconds a measurement at ``batch`` needs, from the fastest step per sample seen so far."""
        seen = [r["step_s"] / r["batch"] for r in self.rows + self.prior]
        per_sample = (min(seen) if seen else 0.05) * slower
        return (self.plan.warmup + self.plan.min_steps) * per_sample * batch + self.plan.measure_s + 2

    def measure(self, mode: str, kind: str, batch: int, step: TrainingStep) -> Optional[dict]:
        """Time ``step`` at ``batch``; a row, or None (and a note) when it runs out of device memory or fails."""
        undo, failure = _mode_setup(mode), None
        try:
            timing = time_steps(step, batch, self.plan)
        except torch.OutOfMemoryError:
            failure = OUT_OF_MEMORY
        except Exception as err:  # e.g. a compiler error: the note says it, the other rows stay
            failure = _one_line(err)
        finally:
            undo()
        if failure is not None:  # outside the except clause: the traceback no longer holds the step's tensors
            step.optimizer.zero_grad(set_to_none=True)
            _free(self.plan.device)
            self.notes.append(f"{mode} at batch {batch}: {failure}")
            self.budget.log(f"{self.name} {self.notes[-1]}")
            self.last_failure = failure
            return None
        row = {"mode": mode, "kind": kind, **timing, "tokens_per_sec": timing["samples_per_sec"] * self.tokens,
               "mfu": mfu(self.flops, timing["samples_per_sec"], self.peak)}
        self.rows.append(row)
        self.budget.log(f"{self.name} {mode} batch {batch}: {row['samples_per_sec']:.1f} samples/s, step "
                        f"{1000 * row['step_s']:.1f} ms, peak {row['peak_gib']:.1f} GiB"
                        + (f", MFU {100 * row['mfu']:.1f}%" if row["mfu"] is not None else ""))
        return row

    def largest(self, mode: str, bf16: bool, slower: float = 1.0) -> Optional[int]:
        """Search the largest batch for ``mode`` and measure it there; the batch, or None when not searched."""
        plan = self.plan
        if not self.budget.allows(f"{self.name} {mode}: largest batch", self.estimate(plan.batch * 8, slower)):
            return None
        step = self.step(bf16)
        undo = _mode_setup(mode)
        try:
            found, stopped = largest_batch(step, plan.batch, plan, self.budget, f"{self.name} {mode}")
        finally:
            undo()
        if stopped:
            self.notes.append(f"{mode}: the largest-batch search stopped at {found} (cap {plan.batch_cap} or budget)")
        if found != plan.batch:
            self.measure(mode, "largest", found, step)
        return found

    def compile(self, batches: list[int]) -> Optional[float]:
        """IGDiTModule.setup's compile (the backbone in place, after the EMA copied it), timed at each batch; the
        seconds compiling took (the first warm-up step's excess). A CPU check uses dynamo's eager backend: the
        tracing is checked, not the code generation, which takes minutes on a laptop."""
        self.module.backbone.compile(**({"backend": "eager"} if self.plan.tiny else {}))
        step, compile_s = self.step(True), None
        for batch in batches:
            target = batch
            while target >= self.plan.batch:
                row = self.measure("bf16-mixed + compile", "paper" if target == self.plan.batch else "largest",
                                   target, step)
                if row is not None:
                    if compile_s is None:
                        compile_s = max(row["warmup_s"] - self.plan.warmup * row["step_s"], 0.0)
                        self.budget.log(f"{self.name}: torch.compile took ~{compile_s:.0f} s")
                    break
                if self.last_failure != OUT_OF_MEMORY:
                    break  # a failure other than memory: a smaller batch will not help
                target //= 2
        return compile_s

    def release(self) -> None:
        del self.module, self.ema, self.optimizer
        torch._dynamo.reset()
        _free(self.plan.device)


def training(name: str, config: str, plan: Plan, budget: Budget, peak: Optional[float], tier: int,
             known: Optional[dict] = None) -> Optional[dict]:
    """The training rows of one model, in two tiers so that a short budget still covers both models first.

    Tier 1: bf16-mixed at the paper's batch and at the largest that fits, fp32 at the paper's batch, bf16-mixed +
    torch.compile at the paper's batch. Tier 2 (a fresh build): fp32 at its largest batch, fp32 + TF32 and (where
    the YAML's optimiser is AdamW) fused AdamW at the paper's batch, bf16-mixed + compile at bf16's largest.
    known: tier 1's result (its largest bf16 batch and compile time)."""
    compile_need = 150 if not plan.tiny else 5
    if tier == 2 and known and known.get("compile_s") is not None:
        compile_need = 1.5 * known["compile_s"] + 20
    if not budget.allows(f"{name} training, tier {tier}", 30 if not plan.tiny else 1):
        return None
    model = Trainee(name, config, plan, budget, peak)
    out = {"largest": {}, "compile_s": None}
    try:
        if tier == 1:
            if budget.allows(f"{name} bf16-mixed batch {plan.batch}", model.estimate(plan.batch)):
                if model.measure("bf16-mixed", "paper", plan.batch, model.step(True)) is not None:
                    out["largest"]["bf16-mixed"] = model.largest("bf16-mixed", True)
            if budget.allows(f"{name} fp32 batch {plan.batch}", model.estimate(plan.batch, 8)):
                model.measure("fp32", "paper", plan.batch, model.step(False))
            if budget.allows(f"{name} bf16-mixed + compile", compile_need):
                out["compile_s"] = model.compile([plan.batch])
        else:
            model.prior = (known or {}).get("rows", [])  # tier 1's rows: what the estimates start from
            out["largest"]["fp32"] = model.largest("fp32", False, 8)
            if budget.allows(f"{name} fp32 + TF32 batch {plan.batch}", model.estimate(plan.batch, 4)):
                model.measure("fp32 + TF32", "paper", plan.batch, model.step(False))
            optimizer = model.model_args["optimizer"]
            if optimizer["class_path"] == "torch.optim.AdamW" and budget.allows(f"{name} fused AdamW",
                                                                               model.estimate(plan.batch)):
                # Not in the YAML: Lightning refuses gradient clipping with a fused optimiser under mixed precision.
                fused = torch.optim.AdamW([p for p in model.module.parameters() if p.requires_grad],
                                          **optimizer.get("init_args", {}), fused=True)
                model.measure("bf16-mixed, fused AdamW", "paper", plan.batch, model.step(True, fused))
                del fused
            # last: the compile is in place, every later step of this module would run compiled
            target = (known or {}).get("largest", {}).get("bf16-mixed")
            if plan.compile_largest and target and target != plan.batch and budget.allows(
                    f"{name} bf16-mixed + compile at batch {target}", compile_need):
                out["compile_s"] = model.compile([target])
    except Exception as err:  # what was measured before stays in the report, with this note
        model.notes.append(f"tier {tier} stopped: {_one_line(err)}")
        budget.log(f"{name} {model.notes[-1]}")
    finally:
        model.release()
    return out | {"rows": model.rows, "notes": model.notes, "params": model.params, "flops_per_sample": model.flops,
                  "optimizer_flops": model.optimizer_flops, "tokens": model.tokens, "settings": model.settings}


def _merge_training(first: Optional[dict], second: Optional[dict]) -> Optional[dict]:
    if not first or not second:
        return first or second
    return first | {"rows": first["rows"] + second["rows"], "notes": first["notes"] + second["notes"],
                    "largest": first["largest"] | second["largest"],
                    "compile_s": first["compile_s"] if first["compile_s"] is not None else second["compile_s"]}


def exit_head_cost(name: str, config: str, plan: Plan, budget: Budget) -> Optional[dict]:
    """bf16-mixed training steps at the paper's batch with and without the exit head (and its loss), interleaved
    over rounds: median step time of each and the median of the per-round ratios; FLOPs of both."""
    if not budget.allows(f"{name} exit-head cost", 40 if not plan.tiny else 2):
        return None
    settings = _yaml_training(config)
    steps, times = {}, {"with_exit": [], "without_exit": []}
    flops = {}
    for key, exit_head in (("with_exit", True), ("without_exit", False)):
        torch.manual_seed(0)
        module = build(paper_model(config, plan.tiny, exit_head), plan.device)
        flops[key] = module.training_flops(1)
        optimizer = module.configure_optimizers()
        optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
        ema = _ema(module, settings["ema_decay"]) if settings["ema_decay"] else None
        module.train_generator = torch.Generator(device=plan.device).manual_seed(0)
        steps[key] = TrainingStep(module, optimizer, True, settings["clip"], ema)
    quick = Plan(**{**plan.__dict__, "measure_s": plan.measure_s / 2, "min_steps": max(2, plan.min_steps - 1)})
    for round_ in range(plan.exit_rounds):
        if round_ and not budget.allows(f"{name} exit-head round {round_ + 1}", 10 if not plan.tiny else 0.5):
            break
        for key, step in steps.items():
            times[key].append(time_steps(step, plan.batch, quick)["step_s"])
    del steps
    _free(plan.device)
    ratios = [a / b for a, b in zip(times["with_exit"], times["without_exit"])]
    result = {"batch": plan.batch, "rounds": len(ratios), "step_s_with": statistics.median(times["with_exit"]),
              "step_s_without": statistics.median(times["without_exit"]), "time_ratio": statistics.median(ratios),
              "flops_ratio": flops["with_exit"] / flops["without_exit"]}
    budget.log(f"{name} exit head: time ratio {result['time_ratio']:.4f}, FLOPs ratio {result['flops_ratio']:.4f}")
    return result


# ---- sampling, decoding, FID during training --------------------------------------------------------------
def _vae_meta(latent_channels: int, folder: Path, tiny: bool) -> dict:
    """Shard metadata whose encoder is a randomly initialised VAE of the real architecture saved in ``folder``
    (``decode_latents`` loads it as it loads a user's VAE), with an identity normaliser. tiny: TINY_VAE instead."""
    from diffusers import AutoencoderKL

    name, config = (f"diffusers:{folder}", TINY_VAE | {"latent_channels": latent_channels}) if tiny \
        else VAES[latent_channels]
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        AutoencoderKL(**config).save_pretrained(folder)
    return {"encoder": {"name": name, "path": str(folder), "latent": "sample"},
            "normalizer": {"shift": [0.0] * latent_channels, "scale": [1.0] * latent_channels}}


def _sample(module, rules, sampling, batch: int, device: str, bf16: bool) -> dict:
    """One batch through igdit.generation.image_batches (the path of `igdit sample` and FIDCallback), latents
    only (module.data_meta None): seconds, NFE per sample, network rows per (NFE x batch)."""
    from igdit.generation import class_labels, image_batches
    from igdit.guidance import Denoiser

    denoiser = Denoiser(module.backbone, rules)
    labels = class_labels(batch, module.num_classes, "random", 0)
    _sync(device)
    start = time.perf_counter()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
        for images, nfe in image_batches(module, denoiser, sampling, list(range(batch)), labels, 0, batch,
                                         progress=False):
            pass
    _sync(device)
    return {"seconds": time.perf_counter() - start, "nfe": nfe, "rows": denoiser.network_rows,
            "rows_ratio": denoiser.network_rows / (nfe * batch)}


def _decode_seconds(meta: dict, module, batch: int, device: str, bf16: bool) -> float:
    """Seconds to decode ``batch`` latents through ``decode_latents`` (median of two, after a warm-up call)."""
    from igdit.data import decode_latents

    latents = torch.randn(batch, *module.latent_shape, device=device)
    times = []
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16,
                                             cache_enabled=False):
            decode_latents(latents, meta)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _timed_sampler(module, rules, sampling, batch: int, plan: Plan, bf16: bool, budget: Budget, what: str,
                   warm: bool = True) -> dict:
    """The sampler at its full step count if that fits plan.sampling_s, else on fewer steps of the same sampler
    and grid, scaled to the full count by steps (``scaled_from`` says so). warm: a short warm-up run first."""
    from dataclasses import replace

    full = sampling.steps
    short = min(full, plan.short_steps[sampling.sampler])
    if warm:  # kernels, allocator
        _sample(module, rules, replace(sampling, steps=short), batch, plan.device, bf16)
    probe = _sample(module, rules, replace(sampling, steps=short), batch, plan.device, bf16)
    estimate = probe["seconds"] * full / short
    if estimate <= min(plan.sampling_s, max(budget.left() - 60, 0)):
        result = _sample(module, rules, sampling, batch, plan.device, bf16) | {"scaled_from": None}
    else:
        steps = max(short, int(full * min(plan.sampling_s, max(budget.left() - 60, 1)) / estimate))
        run = probe if steps == short else _sample(module, rules, replace(sampling, steps=steps), batch, plan.device,
                                                   bf16)
        scale = full / steps
        result = {"seconds": run["seconds"] * scale, "nfe": round(run["nfe"] * scale), "rows": run["rows"] * scale,
                  "rows_ratio": run["rows_ratio"], "scaled_from": steps}
    budget.log(f"{what}: {result['seconds']:.1f} s per batch of {batch}"
               + (f" (scaled from {result['scaled_from']} steps)" if result["scaled_from"] else ""))
    return result


def sampling(name: str, config: str, preset_name: str, plan: Plan, budget: Budget, peak: Optional[float],
             scratch: Path) -> Optional[dict]:
    """The preset's sampler with its guidance (IG + CFG) at plan.sampling_batch: under bf16 autocast (what the
    FIDCallback runs in a bf16-mixed fit) and in fp32 (what `igdit sample` runs: fp32 weights, no autocast); the
    VAE decode of each; IG against no guidance on a short run; and one batch of each FIDCallback setting of the
    paper YAML for the FID-10k estimate."""
    from igdit.generation import Sampling
    from igdit.guidance import InternalGuidance, build_rules, parse_settings
    from igdit.presets import PRESETS

    if not budget.allows(f"{name} sampling", 60 if not plan.tiny else 2):
        return None
    device, batch = plan.device, plan.sampling_batch
    module = build(paper_model(config, plan.tiny), device).eval()
    with torch.no_grad():  # zero-initialised heads would make every guided velocity equal: cost does not care, but
        for p in module.backbone.parameters():  # keep the arithmetic as a trained model's
            p.add_(0.02 * torch.randn_like(p))
    preset = PRESETS[preset_name]
    rules = build_rules(preset.guidance, f"preset {preset_name}")
    exits = tuple(module.backbone.exit_indices)
    row_flops = forward_flops(module, exits)
    meta = _vae_meta(module.latent_shape[0], scratch / f"vae-{module.latent_shape[0]}", plan.tiny)
    out = {"preset": preset_name, "batch": batch, "sampling": preset.sampling.describe(), "guidance": preset.guidance,
           "forward_gflops": row_flops / 1e9, "modes": {}}
    for mode, bf16 in (("bf16 autocast", True), ("fp32", False)):
        if mode == "fp32" and not budget.allows(f"{name} fp32 sampling", 40 if not plan.tiny else 1):
            continue
        run = _timed_sampler(module, rules, preset.sampling, batch, plan, bf16, budget, f"{name} {mode} {preset_name}")
        decode = _decode_seconds(meta, module, batch, device, bf16)
        images_per_sec = batch / (run["seconds"] + decode)
        out["modes"][mode] = run | {
            "decode_s": decode, "images_per_sec": images_per_sec,
            "mfu": mfu(row_flops * run["rows"] / batch, batch / run["seconds"], peak),
            "fid50k_minutes": FID_RUN_IMAGES / FID_RUN_GPUS / images_per_sec / 60}
    # IG against no guidance: same sampler, a short run, bf16, interleaved (a warm-up round first)
    short = replace_steps(preset.sampling, plan.short_steps[preset.sampling.sampler])
    ig = [r for r in rules if isinstance(r, InternalGuidance)]
    pair = {"none": [], "ig": ig}
    times = {k: [] for k in pair}
    counts = {}
    for round_ in range(plan.ig_rounds + 1):
        for key, chosen in pair.items():
            run = _sample(module, chosen, short, batch, device, True)
            if round_:
                times[key].append(run["seconds"])
            counts[key] = (run["nfe"], run["rows"])
    out["ig_vs_none"] = {"steps": short.steps, "rounds": plan.ig_rounds, "nfe": counts["ig"][0],
                         "nfe_none": counts["none"][0],
                         "rows": counts["ig"][1], "rows_none": counts["none"][1],
                         "time_ratio": statistics.median(a / b for a, b in zip(times["ig"], times["none"]))}
    budget.log(f"{name} IG/none: {out['ig_vs_none']['time_ratio']:.3f} at NFE {counts['ig'][0]} vs {counts['none'][0]}")
    # FID-10k during training: one batch of every FIDCallback setting of the paper YAML
    callback = next(c["init_args"] for c in yaml.safe_load(_config_path(config).read_text())["trainer"]["callbacks"]
                    if c["class_path"].endswith("FIDCallback"))
    fid_sampling = Sampling(callback.get("sampler", "euler"), callback.get("steps", 50), callback.get("schedule"))
    fid_batch = plan.fid_batch or callback.get("batch_size", 250)
    settings = parse_settings(callback["settings"], "FIDCallback.settings")
    if budget.allows(f"{name} FID-10k settings", 30 if not plan.tiny else 1):
        per_setting = {key: _timed_sampler(module, chosen, fid_sampling, fid_batch, plan, True, budget,
                                           f"{name} FID setting {key}", warm=i == 0)
                       for i, (key, chosen) in enumerate(settings.items())}
        # what Inception-v3 adds, against the cheapest setting's network FLOPs per sample
        sample_flops = row_flops * min(r["rows"] for r in per_setting.values()) / fid_batch
        out["fid"] = {"callback": callback, "batch": fid_batch, "per_setting": per_setting,
                      "decode_s_per_image": _decode_seconds(meta, module, fid_batch, device, True) / fid_batch,
                      "inception_gflops": inception_flops() / 1e9, "sample_gflops": sample_flops / 1e9}
    del module
    _free(device)
    return out


def inception_flops() -> int:
    """FLOPs of Inception-v3 on one 299 x 299 image (torchvision's architecture, which the FID port shares),
    counted on the meta device."""
    from lightning.fabric.utilities.throughput import measure_flops
    from torchvision.models import inception_v3

    with torch.device("meta"):
        net = inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
        x = torch.empty(1, 3, 299, 299)
    return measure_flops(net, lambda: net(x))


def replace_steps(sampling, steps: int):
    from dataclasses import replace

    return replace(sampling, steps=steps)


def fid_overhead(fid: dict, step_s: float, settings: dict, plan: Plan) -> dict:
    """Seconds one FIDCallback evaluation takes per GPU at paper scale and its fraction of the training time
    between two evaluations: every rank samples ceil(num_samples / world) images per setting in batches of the
    callback's batch_size (the measured batch times), decodes them (the measured decode rate) and runs
    Inception-v3 on them (not timed: its weights are not on the machine; ``inception_share`` is its FLOPs against
    one sample's network FLOPs)."""
    callback = fid["callback"]
    world = settings["world"]
    per_rank = math.ceil(callback.get("num_samples", 10_000) / world)
    batches = math.ceil(per_rank / callback.get("batch_size", 250))
    # the measured batch may be smaller than the callback's (--tiny): scale per image
    sampling_s = sum(r["seconds"] / fid["batch"] * callback.get("batch_size", 250) * batches
                     for r in fid["per_setting"].values())
    decode_s = fid["decode_s_per_image"] * per_rank * len(fid["per_setting"])
    eval_s = sampling_s + decode_s
    every = callback.get("every_n_steps") or 1
    train_s = every * step_s
    reference_s = fid["decode_s_per_image"] * math.ceil(callback.get("reference_max_samples", 50_000) / world)
    return {"per_rank": per_rank, "batches": batches, "sampling_s": sampling_s, "decode_s": decode_s, "eval_s": eval_s,
            "every_n_steps": every, "train_s": train_s, "fraction": eval_s / train_s, "reference_once_s": reference_s,
            "inception_share": fid["inception_gflops"] / fid["sample_gflops"]}


# ---- data -------------------------------------------------------------------------------------------------
def streaming(name: str, config: str, latent_shape: tuple, plan: Plan, budget: Budget) -> Optional[dict]:
    """Posterior shards of the model's latent shape (mean and std in float32, the build's default; a fresh draw at
    every read) through LatentDataModule and a real DataLoader: samples/s with one worker and with the paper YAML's
    data.num_workers where the machine has a core for each (else one worker's rate times that count)."""
    from igdit.bench.lightningdit import _shards, _stream
    from igdit.data.shards import DEFAULT_MOMENTS_DTYPE

    if not budget.allows(f"{name} posterior streaming", 40 if not plan.tiny else 3):
        return None
    default = _yaml_training(config)["num_workers"]
    counts = [1]
    cores = os.cpu_count() or 1
    if plan.stream_workers is None and cores > default:
        counts.append(default)
    rates = {}
    with tempfile.TemporaryDirectory(prefix="igdit-bench-gpu-stream-") as scratch:
        per_shard = max(1, plan.stream_samples // max(counts))
        root = _shards(Path(scratch) / "posterior", plan.stream_samples, per_shard, tuple(latent_shape), True,
                       dtype=DEFAULT_MOMENTS_DTYPE)
        for workers in counts:
            rates[workers] = _stream(root, workers, 256 if not plan.tiny else 16, plan.stream_batches)
    result = {"shape": tuple(latent_shape), "dtype": DEFAULT_MOMENTS_DTYPE, "default_workers": default,
              "rates": rates, "per_worker": rates[1],
              "default_rate": rates.get(default, default * rates[1]), "default_measured": default in rates}
    budget.log(f"{name} posterior streaming: {rates[1]:,.0f} samples/s per worker"
               + (f", {rates[default]:,.0f} with {default}" if default in rates else ""))
    return result


# ---- the run ----------------------------------------------------------------------------------------------
def run(plan: Plan, models: Optional[list[str]] = None, echo: Callable[[str], None] = print) -> dict:
    """Every measurement of the GPU benchmark on plan.device within plan.budget_s seconds; the result dict that
    ``sections`` reports. models: names of MODELS (default all)."""
    budget = Budget(plan.budget_s, echo)
    env = environment(plan.device)
    budget.log(f"{env['name']}, torch {env['torch']}, CUDA {env['cuda']}, budget {plan.budget_s:.0f} s"
               + (" (tiny models: a CPU check)" if plan.tiny else ""))
    if _cuda(plan.device) and torch.device(plan.device).index is not None:
        torch.cuda.set_device(plan.device)  # events and caches on the chosen device
    peak = env["peak_tflops"]
    chosen = {k: v for k, v in MODELS.items() if models is None or k in models}
    results: dict = {"env": env, "plan": dict(plan.__dict__), "models": {}}
    with tempfile.TemporaryDirectory(prefix="igdit-bench-gpu-") as scratch:
        def attempt(name: str, key: str, measure: Callable[[], Optional[dict]]) -> Optional[dict]:
            """One measurement; a failure is recorded in one line, and the others still run."""
            try:
                return measure()
            except Exception as err:
                entry = results["models"][name]
                entry[f"error_{key}"] = _one_line(err)
                budget.log(f"{name} {key} failed: {entry[f'error_{key}']}")
                _free(plan.device)
                return None

        # breadth first: both models' essential rows, then their sampling and data, then the expensive extras
        for name, (config, preset) in chosen.items():
            results["models"][name] = {"config": config}
            results["models"][name]["training"] = attempt(
                name, "training", lambda: training(name, config, plan, budget, peak, tier=1))
        for name, (config, preset) in chosen.items():
            entry = results["models"][name]
            entry["exit_head"] = attempt(name, "exit_head", lambda: exit_head_cost(name, config, plan, budget))
            entry["sampling"] = attempt(name, "sampling",
                                        lambda: sampling(name, config, preset, plan, budget, peak, Path(scratch)))
            entry["streaming"] = attempt(name, "streaming", lambda: streaming(name, config, _latent_shape(config, plan),
                                                                               plan, budget))
        for name, (config, preset) in chosen.items():
            entry = results["models"][name]
            more = attempt(name, "training_extra",
                           lambda: training(name, config, plan, budget, peak, tier=2, known=entry["training"]))
            entry["training"] = _merge_training(entry["training"], more)
    for name, entry in results["models"].items():
        train, fid = entry.get("training"), (entry.get("sampling") or {}).get("fid")
        if train and fid:
            entry["fid_overhead"] = {mode: fid_overhead(fid, r["step_s"], train["settings"], plan)
                                     for mode, r in _paper_rows(train).items()
                                     if mode in ("bf16-mixed", "bf16-mixed + compile")}
    results["skipped"] = budget.skipped
    results["wall_s"] = budget.elapsed()
    budget.log(f"done in {results['wall_s']:.0f} s" + (f"; skipped {len(budget.skipped)}" if budget.skipped else ""))
    return results


def _latent_shape(config: str, plan: Plan) -> tuple:
    backbone = paper_model(config, plan.tiny)["backbone"]["init_args"]
    side = backbone.get("input_size")
    return (backbone.get("in_channels"), side, side)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def _paper_rows(train: dict) -> dict[str, dict]:
    return {r["mode"]: r for r in train["rows"] if r["kind"] == "paper"}


def consumption(train: Optional[dict]) -> Optional[tuple[str, float]]:
    """What one GPU consumes in training at the paper's batch: the fastest mode's samples/s."""
    if not train:
        return None
    rows = [r for r in train["rows"] if r["kind"] == "paper"]
    if not rows:
        return None
    best = max(rows, key=lambda r: r["samples_per_sec"])
    return best["mode"], best["samples_per_sec"]


# ---- the report -------------------------------------------------------------------------------------------
def _pct(value: Optional[float]) -> str:
    return "unknown" if value is None else f"{100 * value:.1f}%"


def _verdict(ok: Optional[bool]) -> str:
    return "not measured" if ok is None else ("**met**" if ok else "**not met**")


def targets(results: dict) -> list[tuple[str, Optional[bool], str]]:
    """(target, met or not or None when not measured, the figure) for the issue's targets."""
    out = []
    sit = results["models"].get("SiT-XL/2 + IG", {})
    train = sit.get("training")
    compiled = [r for r in (train or {"rows": []})["rows"] if r["mode"] == "bf16-mixed + compile"]
    best = max((r["mfu"] for r in compiled if r["mfu"] is not None), default=None)
    out.append(("SiT-XL/2 + IG, bf16-mixed + compile: MFU >= 50%", None if best is None else best >= 0.5,
                f"best {_pct(best)}" if best is not None else "no compiled row with a known peak"))
    for name, entry in results["models"].items():
        exit_ = entry.get("exit_head")
        out.append((f"{name}: exit head <= 1% of the step time", None if not exit_ else exit_["time_ratio"] <= 1.01,
                    f"ratio {exit_['time_ratio']:.4f}" if exit_ else "-"))
        vs = (entry.get("sampling") or {}).get("ig_vs_none")
        ok = None if not vs else (vs["nfe"] == vs["nfe_none"] and vs["rows"] == vs["rows_none"]
                                  and vs["time_ratio"] <= 1.03)
        out.append((f"{name}: IG adds no forward pass and <= 3% sampling time", ok,
                    f"NFE {vs['nfe']} vs {vs['nfe_none']}, time ratio {vs['time_ratio']:.3f}" if vs else "-"))
        fid = entry.get("fid_overhead") or {}
        chosen = fid.get("bf16-mixed + compile") or fid.get("bf16-mixed")
        out.append((f"{name}: FID-10k <= 10% of the training time between two", None if not chosen
                    else chosen["fraction"] <= 0.10, f"{_pct(chosen['fraction'])}" if chosen else "-"))
        stream, used = entry.get("streaming"), consumption(entry.get("training"))
        ratio = stream["default_rate"] / used[1] if stream and used else None
        out.append((f"{name}: posterior streaming >= 5x one GPU's consumption", None if ratio is None else ratio >= 5,
                    f"{ratio:.1f}x" if ratio is not None else "-"))
    return out


def sections(results: dict) -> list[str]:
    """The report's "GPU benchmark" section (starts with '## ')."""
    env, plan = results["env"], results["plan"]
    cpu_check = not _cuda(env["device"])
    lines = ["## GPU benchmark (targets: SiT-XL/2 + IG bf16 + compile >= 50% MFU; exit head <= 1% of a step; IG "
             "sampling no extra forward pass and <= 3% time; FID-10k <= 10% of training time; streaming >= 5x one "
             "GPU's consumption)\n"]
    if cpu_check:
        lines += ["**No GPU run has been made yet**: no figure below comes from a GPU. `make bench-gpu` on a machine "
                  "with an NVIDIA GPU (H100/H200: under 8 minutes) replaces this section with the measured one.\n",
                  f"What follows is a **CPU check of the script** (`python -m igdit.bench --gpu --device cpu --tiny`, "
                  f"{env['date']}, {env['name']}, torch {env['torch']}): the paper YAMLs' models with tiny backbones "
                  f"({', '.join(f'{k} {v}' for k, v in TINY_BACKBONE.items())}), batch {plan['batch']}, compile on "
                  "dynamo's eager backend. Its numbers say that every measurement runs and how the report reads, "
                  "nothing about any GPU; MFU is unknown on a CPU.\n"]
    else:
        lines += [f"`make bench-gpu` (`python -m igdit.bench --gpu`), {env['date']}: **{env['name']}** "
                  f"({env['memory_gib']:.0f} GiB, compute capability {env['capability']}), torch {env['torch']}, "
                  f"CUDA {env['cuda']}, cuDNN {env['cudnn']}, {env['cpu_count']} CPU cores; whole run "
                  f"{results['wall_s']:.0f} s of a {plan['budget_s']:.0f} s budget. MFU against "
                  + (f"{env['peak_tflops']:.0f} TFLOP/s (dense bf16 peak of this device)" if env["peak_tflops"]
                     else "an unknown peak (device not in the table): MFU unknown") + ".\n"]
    lines += ["Training: random latents on the device, the paper YAML's model, optimiser, gradient clip and EMA, "
              "one step as Lightning's fit loop runs it (`igdit.bench.gpu.TrainingStep`); step = wall time per step "
              f"after {plan['warmup']} warm-up step(s) (at least {plan['min_steps']} steps and {plan['measure_s']:g} "
              f"s); its parts are medians of {'perf_counter' if cpu_check else 'CUDA-event'} intervals. "
              "MFU: forward + backward FLOPs per sample counted once "
              "on the meta device (`IGDiTModule.training_flops`, exit head included) x samples/s / peak. "
              "'largest': the largest batch paper x 2^k whose step fits in device memory (doubling until out of "
              "memory); " + ("compile runs at bf16's largest." if plan["compile_largest"] else
                             "compile runs at the paper batch only.") + "\n",
              "| model | mode | batch | samples/s | tokens/s | step (ms) | fwd+bwd / optimiser / EMA (ms) | "
              "peak memory (GiB) | MFU |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, entry in results["models"].items():
        train = entry.get("training")
        if not train:
            lines.append(f"| {name} | - | - | - | - | - | - | - | - |")
            if entry.get("error_training"):
                notes.append(f"{name} training failed: {entry['error_training']}")
            continue
        for r in sorted(train["rows"], key=lambda r: (MODES.index(r["mode"]), r["kind"] != "paper")):
            batch = f"{r['batch']}" + (" (largest)" if r["kind"] == "largest" else "")
            lines.append(f"| {name} | {r['mode']} | {batch} | {r['samples_per_sec']:,.1f} | {r['tokens_per_sec']:,.0f} | "
                         f"{1000 * r['step_s']:.1f} | {1000 * r['fwd_bwd_s']:.1f} / {1000 * r['optimizer_s']:.1f} / "
                         f"{1000 * r['ema_s']:.1f} | {r['peak_gib']:.2f} | {_pct(r['mfu'])} |")
        notes += [f"{name}: {n}" for n in train["notes"]]
        if train.get("compile_s") is not None:
            notes.append(f"{name}: torch.compile took ~{train['compile_s']:.0f} s (first forward and backward)")
        notes.append(f"{name}: {train['params']:,} parameters, {train['flops_per_sample'] / 1e9:.4g} GFLOPs "
                     f"per training sample (forward + backward), {train['tokens']} tokens per sample")
        if train.get("optimizer_flops"):
            step = train["flops_per_sample"] * plan["batch"]
            notes.append(f"{name}: Muon's Newton-Schulz iterations: {train['optimizer_flops'] / 1e12:.4g} TFLOPs per "
                         f"optimiser step, {train['optimizer_flops'] / step:.2f}x the model FLOPs of a step at batch "
                         f"{plan['batch']} (in the optimiser column's time, not in MFU)")
    if cpu_check:
        lines.append("\n(CPU check: 'peak memory' is the process's peak resident memory, not a device's.)")
    lines += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    lines += ["**Exit head** (bf16-mixed, paper batch, with and without the exit head and its loss, interleaved "
              "rounds; target: time ratio <= 1.01):\n",
              "| model | rounds | step with (ms) | step without (ms) | time ratio | FLOPs ratio |", "|---|---|---|---|---|---|"]
    for name, entry in results["models"].items():
        e = entry.get("exit_head")
        lines.append(f"| {name} | " + (f"{e['rounds']} | {1000 * e['step_s_with']:.1f} | {1000 * e['step_s_without']:.1f} | "
                                       f"{e['time_ratio']:.4f} | {e['flops_ratio']:.4f} |" if e else
                                       "- | - | - | " + entry.get("error_exit_head", "not measured") + " | - |"))
    lines += ["", f"**Sampling** with the published presets (random weights; `igdit.generation.image_batches`, "
              f"latents then `decode_latents` through a random VAE of the real architecture), batch "
              f"{plan['sampling_batch']}: bf16 autocast is what FIDCallback runs inside a bf16-mixed fit; fp32 is what "
              "`igdit sample` runs (fp32 weights, no autocast). "
              + (f"A run longer than {plan['sampling_s']:g} s is" if plan["sampling_s"] else "Every run is")
              + " timed on fewer steps of the same sampler and scaled by steps (marked). MFU: forward FLOPs (exit head "
              "included) x network rows / sampler seconds. 50k FID run: 50,000 images on 8 such GPUs, "
              "decoding included.\n",
              "| model | preset | precision | NFE | rows / (NFE x batch) | sampler s / batch | decode s / batch | "
              "images/s | MFU | 50k on 8 GPUs (min) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in results["models"].items():
        s = entry.get("sampling")
        if not s:
            lines.append(f"| {name} | - | - | - | - | - | - | - | - | {entry.get('error_sampling', 'not measured')} |")
            continue
        for mode, m in s["modes"].items():
            scaled = f" (from {m['scaled_from']} steps)" if m["scaled_from"] else ""
            lines.append(f"| {name} | `{s['preset']}` | {mode} | {m['nfe']}{scaled} | {m['rows_ratio']:.2f} | "
                         f"{m['seconds']:.2f} | {m['decode_s']:.2f} | {m['images_per_sec']:.2f} | {_pct(m['mfu'])} | "
                         f"{m['fid50k_minutes']:,.1f} |")
    lines += ["", f"IG against no guidance (bf16 autocast, the preset's sampler on a short grid, {plan['ig_rounds']} "
              "interleaved rounds after a warm-up one, median of the per-round ratios; target: same NFE and network "
              "rows, time ratio <= 1.03):\n",
              "| model | steps | NFE IG / none | rows IG / none | time ratio |", "|---|---|---|---|---|"]
    for name, entry in results["models"].items():
        v = (entry.get("sampling") or {}).get("ig_vs_none")
        lines.append(f"| {name} | " + (f"{v['steps']} | {v['nfe']} / {v['nfe_none']} | {v['rows']} / {v['rows_none']} | "
                                       f"{v['time_ratio']:.3f} |" if v else "- | - | - | - |"))
    lines += ["", "**FID-10k during training** at the paper's schedule (the paper YAML's FIDCallback: its settings, "
              "sampler, steps, num_samples, batch_size and every_n_steps; 8 GPUs share the samples): seconds of one "
              "evaluation per GPU (each setting's batches as measured under bf16 autocast, decoding at the measured "
              "rate; Inception-v3 not timed: its weights are not here, and its FLOPs are the last column's share "
              "of one sample's network FLOPs) against every_n_steps x the training step at the paper's per-GPU "
              "batch. Target: <= 10%.\n",
              "| model | training mode | evaluation per GPU (s) | of which decoding (s) | training between two (h) | "
              "fraction | reference statistics, once (s) | Inception FLOPs / sample FLOPs |",
              "|---|---|---|---|---|---|---|---|"]
    for name, entry in results["models"].items():
        for mode, f in (entry.get("fid_overhead") or {"-": None}).items():
            lines.append(f"| {name} | {mode} | " + (f"{f['eval_s']:,.0f} | {f['decode_s']:,.0f} | {f['train_s'] / 3600:,.2f} | "
                                                    f"{_pct(f['fraction'])} | {f['reference_once_s']:,.0f} | "
                                                    f"{100 * f['inception_share']:.2f}% |" if f else
                                                    "- | - | - | - | - | - |"))
    lines += ["", "**Data**: posterior shards (mean and std, float32 as `igdit data build --latent posterior` writes "
              "them; a fresh draw at every read) through `LatentDataModule` and a real DataLoader, against what one "
              "GPU consumes in training (the fastest paper-batch row above). Target: the paper YAML's workers "
              "deliver >= 5x.\n",
              "| model | latent | samples/s, 1 worker | samples/s, default workers | GPU consumes (samples/s) | ratio |",
              "|---|---|---|---|---|---|"]
    for name, entry in results["models"].items():
        d, used = entry.get("streaming"), consumption(entry.get("training"))
        if not d:
            lines.append(f"| {name} | - | - | - | - | {entry.get('error_streaming', 'not measured')} |")
            continue
        default = (f"{d['default_rate']:,.0f} ({d['default_workers']} workers"
                   + (")" if d["default_measured"] else ", 1 worker's rate x that: the machine has too few cores)"))
        lines.append(f"| {name} | {'x'.join(map(str, d['shape']))} | {d['per_worker']:,.0f} | {default} | "
                     + (f"{used[1]:,.1f} ({used[0]}) | {d['default_rate'] / used[1]:.1f}x |" if used else "- | - |"))
    lines += ["", "**Targets**" + (" (a CPU check evaluates none of them)" if cpu_check else "") + ":\n"]
    if cpu_check:
        lines.append("- all: not measured (no GPU)")
    else:
        lines += [f"- {target}: {_verdict(ok)} ({figure})" for target, ok, figure in targets(results)]
    if results.get("skipped"):
        lines += ["", "Skipped to stay within the time budget: " + "; ".join(results["skipped"]) + "."]
    errors = [f"{name} {key[6:]}: {value}" for name, entry in results["models"].items()
              for key, value in entry.items() if key.startswith("error_") and key != "error_training"]
    if errors:
        lines += ["", "Failed: " + "; ".join(errors) + "."]
    return lines + [""]
