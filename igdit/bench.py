"""`make bench`: measure the speed and memory targets side by side in one run and write a report.

Targets: the default run's training part <= 8 min on 2 CPU cores; the exit head costs <= 1% of a training
step against the same backbone without it; peak memory of the default run < 4 GiB; IG adds no forward pass
in sampling; one FID evaluation costs <= 20% of the training time between two, in memory flat in K.
Timings on a shared machine are noisy: the exit-head comparison interleaves the two variants and reports
the median of per-round ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch


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

    from igdit.module import IGDiTModule

    model_args = yaml.safe_load(Path(config).read_text())["model"]
    batch = yaml.safe_load(Path(config).read_text())["data"]["batch_size"]
    torch.manual_seed(0)
    with_exit = IGDiTModule(**model_args)
    torch.manual_seed(0)
    without = IGDiTModule(**{**model_args, "exits": [], "exit_loss": {**model_args.get("exit_loss", {}), "weight": 0.0}})
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

    from igdit.guidance import Denoiser, GuidanceRule
    from igdit.module import IGDiTModule
    from igdit.samplers import euler_ode

    model_args = yaml.safe_load(Path(config).read_text())["model"]
    torch.manual_seed(0)
    module = IGDiTModule(**model_args).eval()
    with torch.no_grad():
        for p in module.backbone.parameters():  # cost does not depend on the values; avoid all-zero heads
            p.add_(0.02 * torch.randn_like(p))
    settings = {
        "none": {},
        "ig w=2 on [0,1]": {"ig": GuidanceRule(2.0)},
        "cfg 1.5 on [0,1]": {"cfg": GuidanceRule(1.5)},
        "cfg 1.5 on [0,0.7]": {"cfg": GuidanceRule(1.5, (0.0, 0.7))},
        "ig 2 + cfg 1.5 on [0,0.7]": {"ig": GuidanceRule(2.0), "cfg": GuidanceRule(1.5, (0.0, 0.7))},
    }
    noise = torch.randn(batch, *module.latent_shape)
    labels = torch.randint(0, module.num_classes, (batch,))
    times = {k: [] for k in settings}
    counts = {}
    for _ in range(rounds):
        for name, rules in settings.items():
            denoiser = Denoiser(module.backbone, **rules)
            start = time.perf_counter()
            _, nfe = euler_ode(denoiser, noise, labels, steps=steps)
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

    from igdit.sweeps import SamplingObjective, SweepSpec, run_sweep

    spec = SweepSpec.load(sweep)
    spec.storage = f"sqlite:///{scratch}/optuna.db"
    spec.tracking_uri = f"sqlite:///{scratch}/mlflow.db"
    start = time.perf_counter()
    SamplingObjective(spec, checkpoint)  # what the runner builds once per sweep
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
        "from igdit.guidance import parse_guidance_settings\n"
        "from igdit.metrics import FrechetEvaluator, evaluate_settings\n"
        "from igdit.module import IGDiTModule\n"
        f"model = IGDiTModule(**yaml.safe_load(open({config!r}))['model'])\n"
        f"dm = LatentDataModule(root={data_root!r})\n"
        "model.data_meta = dm.meta\n"
        f"ev = FrechetEvaluator('digits', {data_root!r})\n"
        "ev.reference_from_data(dm, 'train')\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "start = time.perf_counter()\n"
        f"res, _ = evaluate_settings(model, parse_guidance_settings({{'none': {{}}}}, 's'), ev, {num_samples}, 'euler', 2)\n"
        "print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - start, res['none']['num_samples'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, peak, seconds, n = int(out[0]), int(out[1]), float(out[2]), int(out[3])
    return {"num_samples": n, "peak_rss_gib": peak / 2**20, "growth_mib": (peak - before) / 2**10, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="experiments/default.yaml")
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--data", default="data/digits", help="the digits shards (make data)")
    parser.add_argument("--skip-run", action="store_true", help="skip the default run (8 minutes)")
    args, extra = parser.parse_known_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    overhead = exit_head_overhead(args.config)
    sampling = sampling_cost(args.config)
    memory = [fid_memory(args.config, args.data, k) for k in (1_000, 10_000)]
    run = None if args.skip_run else default_run(args.config, extra)
    sweep = None if run is None else sampling_sweep("sweeps/ig_guidance.yaml", run["checkpoint"], run["scratch"])
    lines = [f"# Benchmarks\n", f"Measured {time.strftime('%Y-%m-%d')} on {machine} by `make bench` "
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
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"exit_head": overhead, "sampling": sampling, "default_run": run, "fid_memory": memory,
                      "sampling_sweep": sweep},
                     indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
