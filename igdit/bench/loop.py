"""The price of Lightning's loop: `igdit fit` as a user runs it against a hand-written loop doing the same steps.

Both sides train the experiment's module on the experiment's data stream: the same LatentDataModule loader (its
worker, its per-batch hook), class dropout and the seeded t/noise generator, the loss terms, AdamW, the LR schedule
stepped every step, gradient-norm clipping at the YAML's ``gradient_clip_val`` and an EMA of the whole module updated
after every step the way Lightning's EMAWeightAveraging does it (``AveragedModel`` with ``get_ema_avg_fn``). The
Lightning side adds what a user's run has besides: the MLflow logger, the learning-rate monitor, the divergence guard,
the throughput monitor, the signal handler, checkpoint bookkeeping. It leaves out what is not the loop -- FID, the
sample grid and validation (the YAML's evaluation every N steps) -- and so does the hand loop; the final checkpoint
comes after the timed steps. Each side runs in a fresh process of its own (`python -m igdit.cli fit`, `python -m
igdit.bench.loop`). Timing runs from the start of step ``start`` to the start of the last step, on both sides, so
start-up and the first (slower) steps are not counted; the two sides alternate in rounds and the report gives the
median per-round ratio.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml

from igdit.bench import measured_on

# Callbacks that evaluate or write samples: not part of the training loop
EVALUATION_CALLBACKS = ("FIDCallback", "SampleGrid")  # matched by class name


class StepClock(pl.Callback):
    """Writes to ``out`` (JSON) the seconds from the start of training step ``start`` to the start of step ``stop``
    (0-based global steps): how the benchmark reads the time of a fit that runs in its own process."""

    def __init__(self, start: int, stop: int, out: str):
        self.start, self.stop, self.out, self.started = start, stop, out, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.start:
            self.started = time.perf_counter()
        if trainer.global_step == self.stop and self.started is not None:
            Path(self.out).write_text(json.dumps({"seconds": time.perf_counter() - self.started,
                                                  "steps": self.stop - self.start}))


def _training_callbacks(trainer: dict) -> list[dict]:
    """The callbacks of an experiment's ``trainer:`` section that belong to the training loop (no evaluation)."""
    return [c for c in trainer.get("callbacks") or []
            if c["class_path"].rsplit(".", 1)[-1] not in EVALUATION_CALLBACKS
            and not (c.get("init_args") or {}).get("monitor")]  # a best-FID checkpoint has nothing to monitor


def _loop_config(config: str, steps: int, start: int, scratch: Path) -> Path:
    """The experiment YAML with its evaluation callbacks removed, ``steps`` steps, no validation, a step clock."""
    cfg = yaml.safe_load(Path(config).read_text())
    trainer = cfg["trainer"]
    kept = _training_callbacks(trainer)
    kept.append({"class_path": f"{__name__}.StepClock",
                 "init_args": {"start": start, "stop": steps - 1, "out": str(scratch / "clock.json")}})
    trainer.update(callbacks=kept, max_steps=steps, limit_val_batches=0, enable_progress_bar=False,
                   default_root_dir=str(scratch / "runs"))
    trainer["logger"]["init_args"].update(tracking_uri=f"sqlite:///{scratch / 'mlflow.db'}",
                                          artifact_location=(scratch / "mlartifacts").as_uri(),
                                          experiment_name="bench-loop")
    path = scratch / "loop.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def lightning_loop(config: Path, data: str) -> tuple[float, Path]:
    """`igdit fit` on the prepared YAML in its own process, as a user runs it: (seconds per step between the
    clock's steps, the run's last.ckpt)."""
    proc = subprocess.run([sys.executable, "-m", "igdit.cli", "fit", "--config", str(config), "--data.root", data],
                          capture_output=True, text=True)
    clock = config.parent / "clock.json"
    if proc.returncode != 0 or not clock.is_file():
        raise RuntimeError(f"the Lightning side of the loop benchmark failed (exit code {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    marks = json.loads(clock.read_text())
    return marks["seconds"] / marks["steps"], next(config.parent.glob("runs/*/*/checkpoints/last.ckpt"))


def hand_loop(config: str, data: str, steps: int, start: int) -> tuple[float, torch.nn.Module, torch.nn.Module]:
    """The same ``steps`` steps written out by hand (no Trainer): (seconds per step between steps ``start`` and
    ``steps - 1``, the trained module, its EMA)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

    from igdit.data import LatentDataModule
    from igdit.module import build_module

    cfg = yaml.safe_load(Path(config).read_text())
    pl.seed_everything(cfg.get("seed_everything", 0), verbose=False)
    module = build_module(cfg["model"])
    datamodule = LatentDataModule(**{**cfg["data"], "root": data})
    # what the data module's per-batch hook reads from a trainer (the skip counter's checks)
    trainer = type("HandLoop", (), {"training": True, "logger": None, "global_step": 0, "checkpoint_callback": None})()
    datamodule.trainer = trainer
    datamodule.setup("fit")
    module.data_meta = datamodule.meta
    generator = torch.Generator().manual_seed(torch.initial_seed())  # as the module seeds it on rank 0
    optimizers = module.configure_optimizers()
    optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
    scheduler = optimizers["lr_scheduler"]["scheduler"] if isinstance(optimizers, dict) else None
    clip = cfg["trainer"].get("gradient_clip_val")
    averaging = next((c.get("init_args") or {} for c in cfg["trainer"].get("callbacks") or []
                      if c["class_path"].endswith("EMAWeightAveraging")), None)
    ema = None if averaging is None else AveragedModel(module, avg_fn=get_ema_avg_fn(averaging.get("decay", 0.999)),
                                                       use_buffers=True)
    module.train()
    marks, step, loader = {}, 0, datamodule.train_dataloader()  # one loader, as Lightning keeps: its workers persist
    while step < steps:  # epochs of the data module's stream
        for batch in loader:
            if step in (start, steps - 1):
                marks[step] = time.perf_counter()
            trainer.global_step = step
            x, y = datamodule.on_before_batch_transfer(batch, 0)
            loss, _ = module.compute_loss(x, module.drop_labels(y, generator), step, generator, y_clean=y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if ema is not None:
                ema.update_parameters(module)
            step += 1
            if step == steps:
                break
    return (marks[steps - 1] - marks[start]) / (steps - 1 - start), module, ema


def _hand_loop_in_own_process(config: str, data: str, steps: int, start: int) -> float:
    """``hand_loop``'s seconds per step, measured in a fresh process as the fit is (no state of this one carried)."""
    proc = subprocess.run([sys.executable, "-m", __name__, config, data, str(steps), str(start)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the hand loop of the loop benchmark failed:\n{proc.stderr[-3000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def loop_overhead(config: str, data: str, steps: int = 150, start: int = 30, rounds: int = 3) -> dict:
    """Median over alternating rounds of (hand loop's seconds per step) / (`igdit fit`'s): 1.0 means Lightning's
    loop and igdit's callbacks cost nothing, 0.9 that a user's run trains at 90% of the hand loop's speed."""
    if not 0 <= start < steps - 1:
        raise ValueError(f"start {start} must lie in [0, steps - 1) = [0, {steps - 1})")
    measured = measured_on()
    cfg = yaml.safe_load(Path(config).read_text())
    times = {"lightning": [], "hand": []}
    with tempfile.TemporaryDirectory(prefix="igdit-bench-loop-") as scratch:  # each round's run and checkpoints
        for index in range(rounds):
            folder = Path(scratch) / f"round{index}"
            folder.mkdir()
            times["lightning"].append(lightning_loop(_loop_config(config, steps, start, folder), data)[0])
            times["hand"].append(_hand_loop_in_own_process(config, data, steps, start))
    ratios = [h / lit for h, lit in zip(times["hand"], times["lightning"])]
    return {"measured": measured, "config": config, "steps": steps, "timed_steps": steps - 1 - start, "rounds": rounds,
            "batch": cfg["data"]["batch_size"],
            "lightning_ms": 1000 * statistics.median(times["lightning"]),
            "hand_ms": 1000 * statistics.median(times["hand"]), "ratio": statistics.median(ratios), "ratios": ratios,
            "kept_callbacks": [c["class_path"].rsplit(".", 1)[-1] for c in _training_callbacks(cfg["trainer"])]}


def loop_section(result: dict) -> list[str]:
    """BENCHMARKS.md's section for ``loop_overhead``'s result."""
    return ["## Training loop (target: `igdit fit` trains as fast as a hand-written loop of the same steps)\n",
            f"Measured {result['measured']} by `python -m igdit.bench --only loop`. "
            f"`{result['config']}` (batch {result['batch']}): {result['timed_steps']} timed steps of a "
            f"{result['steps']}-step fit, {result['rounds']} alternating rounds. Both sides: the data module's "
            "stream, class dropout, the loss terms, the optimiser and LR schedule, gradient clipping, the EMA of the "
            "module after every step. The Lightning side also has the YAML's callbacks other than evaluation ("
            + ", ".join(result["kept_callbacks"]) + ") and the MLflow logger. FID, the sample grid and validation are "
            "left out of both, and the final checkpoint comes after the timed steps. From the same seed the two "
            "loops end with the same weights and EMA, bit for bit (tests/test_bench.py).\n",
            "| loop | median step (ms) |", "|---|---|",
            f"| hand-written (no Trainer) | {result['hand_ms']:.1f} |",
            f"| `igdit fit` (Lightning) | {result['lightning_ms']:.1f} |",
            f"\n`igdit fit` trains at **{result['ratio']:.3f}x** the hand loop's speed (median of per-round ratios; "
            f"rounds: {', '.join(f'{r:.3f}' for r in result['ratios'])}).\n"]


if __name__ == "__main__":  # python -m igdit.bench.loop <config> <data> <steps> <start>: the hand loop's s/step
    print(hand_loop(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))[0])
