"""`make bench-gpu` (igdit.bench.gpu) checked where there is no GPU: the CPU check (`--device cpu --tiny`) runs
every measurement end to end through `python -m igdit.bench --gpu`, its numbers agree with each other, and the
report reads as the GPU report will (rendered from the same results with a GPU's name), with the figures said
to come from a CPU check."""
import copy
import math
import os

import pytest
import torch

from igdit.bench import core
from igdit.bench import gpu as bench_gpu


def test_mfu_is_taken_against_the_known_bf16_peaks_only():
    assert bench_gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert bench_gpu.peak_tflops("NVIDIA H100 PCIe") == 756
    assert bench_gpu.peak_tflops("NVIDIA H200") == 989
    assert bench_gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert bench_gpu.peak_tflops("NVIDIA GeForce RTX 4090") is None
    assert bench_gpu.mfu(1e12, 494.5, 989) == pytest.approx(0.5)
    assert bench_gpu.mfu(1e12, 494.5, None) is None


@pytest.mark.parametrize("argv, message", [
    (["--gpu", "--device", "cpu"], "error: --device: cpu is not allowed without --tiny"),
    (["--gpu", "--device", "tpu", "--tiny"], "error: --device: tpu is not allowed"),
    (["--gpu", "--device", "cpu", "--tiny", "--models", "DiT-XL/2"], "error: --models: DiT-XL/2 is not allowed"),
] + ([] if torch.cuda.is_available() else [(["--gpu"], "error: --gpu: no CUDA device here")]))
def test_a_gpu_run_that_cannot_run_here_stops_with_one_line(argv, message, tmp_path, capsys):
    assert core.main([*argv, "--out", str(tmp_path / "B.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "B.md").exists()


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    """One `python -m igdit.bench --gpu --device cpu --tiny` into a report with other sections; (results, report)."""
    out = tmp_path_factory.mktemp("bench") / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n## Exit head cost (target: <= 1% of a training step)\n\nratio 1.0165\n\n"
                   "## Posterior moments: float16 vs float32\n\nkept\n")
    recorded = {}
    original = bench_gpu.run

    def recording(*args, **kwargs):
        recorded["results"] = original(*args, **kwargs)
        return recorded["results"]

    bench_gpu.run = recording
    threads, cwd = torch.get_num_threads(), os.getcwd()
    os.chdir(out.parent)  # a module-scoped fixture runs before conftest's own folder: take one here
    try:
        assert core.main(["--gpu", "--device", "cpu", "--tiny", "--out", str(out)]) == 0
    finally:
        bench_gpu.run = original
        torch.set_num_threads(threads)
        os.chdir(cwd)
    return recorded["results"], out.read_text()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_cpu_check_measures_everything_and_the_numbers_agree(cpu_check):
    results, _ = cpu_check
    assert results["skipped"] == [] and results["env"]["peak_tflops"] is None
    assert set(results["models"]) == set(bench_gpu.MODELS)
    for name, entry in results["models"].items():
        assert not [k for k in entry if k.startswith("error_")], entry
        train = entry["training"]
        modes = {(r["mode"], r["kind"]) for r in train["rows"]}
        expected = {("bf16-mixed", "paper"), ("bf16-mixed", "largest"), ("fp32", "paper"), ("fp32", "largest"),
                    ("fp32 + TF32", "paper"), ("bf16-mixed + compile", "paper")}
        if name.startswith("SiT"):  # AdamW in the YAML: the fused variant is measured too (Muon has none)
            expected.add(("bf16-mixed, fused AdamW", "paper"))
        assert modes == expected
        assert train["largest"] == {"bf16-mixed": 8, "fp32": 8}  # the tiny plan's cap
        assert train["tokens"] == 16 and train["flops_per_sample"] > 0 and train["compile_s"] >= 0
        assert (train["optimizer_flops"] > 0) == name.startswith("LightningDiT")  # Muon's Newton-Schulz
        for r in train["rows"]:
            assert r["batch"] == (2 if r["kind"] == "paper" else 8)
            assert r["samples_per_sec"] * r["step_s"] == pytest.approx(r["batch"])
            assert r["tokens_per_sec"] == pytest.approx(r["samples_per_sec"] * train["tokens"])
            assert min(r["fwd_bwd_s"], r["optimizer_s"], r["ema_s"], r["peak_gib"]) > 0 and r["mfu"] is None
        exit_ = entry["exit_head"]
        assert exit_["rounds"] == 1 and 1 < exit_["flops_ratio"] < 1.1 and exit_["time_ratio"] > 0

        sampling = entry["sampling"]
        full = {"sit-xl2-ig-cfg": 250, "lightningdit-xl1-ig-cfg": 248}[sampling["preset"]]  # NFE: SDE 250, Heun 2 x 124
        for mode in ("bf16 autocast", "fp32"):
            m = sampling["modes"][mode]
            assert m["nfe"] == full and m["scaled_from"] is not None
            assert 1 < m["rows_ratio"] < 2  # CFG doubles the batch inside its interval only
            assert m["images_per_sec"] == pytest.approx(2 / (m["seconds"] + m["decode_s"]))
            assert m["fid50k_minutes"] == pytest.approx(50_000 / 8 / m["images_per_sec"] / 60)
        ig = sampling["ig_vs_none"]
        assert ig["nfe"] == ig["nfe_none"] and ig["rows"] == ig["rows_none"]  # IG reads the exit of the same pass

        for mode, fid in entry["fid_overhead"].items():
            step = next(r["step_s"] for r in train["rows"] if r["mode"] == mode and r["kind"] == "paper")
            assert (fid["per_rank"], fid["batches"], fid["every_n_steps"]) == (1250, 10, 100_000)
            assert fid["eval_s"] == pytest.approx(fid["sampling_s"] + fid["decode_s"])
            assert fid["fraction"] == pytest.approx(fid["eval_s"] / (100_000 * step))
            assert fid["inception_share"] > 0  # tiny models: Inception costs more than they do

        stream = entry["streaming"]
        assert stream["dtype"] == "float32" and stream["default_workers"] == 8 and not stream["default_measured"]
        assert stream["default_rate"] == pytest.approx(8 * stream["per_worker"]) and stream["per_worker"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_report_merges_and_says_its_figures_are_a_cpu_check(cpu_check):
    results, report = cpu_check
    assert report.count("## GPU benchmark") == 1 and "ratio 1.0165" in report and "\nkept\n" in report
    section = report[report.index("## GPU benchmark"):]
    assert "**No GPU run has been made yet**" in section and "**CPU check of the script**" in section
    assert "- all: not measured (no GPU)" in section and "MFU is unknown" in section
    r = next(r for r in results["models"]["SiT-XL/2 + IG"]["training"]["rows"]
             if (r["mode"], r["kind"]) == ("bf16-mixed", "paper"))
    assert f"| SiT-XL/2 + IG | bf16-mixed | 2 | {r['samples_per_sec']:,.1f} | {r['tokens_per_sec']:,.0f} | " in section
    for title in ("**Exit head**", "**Sampling**", "IG against no guidance", "**FID-10k during training**", "**Data**"):
        assert title in section


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_gpu_report_states_the_device_mfu_and_each_target(cpu_check):
    results = copy.deepcopy(cpu_check[0])
    results["env"] |= {"device": "cuda", "name": "NVIDIA H100 80GB HBM3", "cuda": "12.8", "cudnn": 91000,
                       "memory_gib": 79.2, "capability": "9.0", "peak_tflops": 989.0}
    sit = results["models"]["SiT-XL/2 + IG"]
    for r in sit["training"]["rows"]:
        r["mfu"] = 0.55 if r["mode"] == "bf16-mixed + compile" else 0.4
    sit["exit_head"]["time_ratio"] = 1.004
    sit["sampling"]["ig_vs_none"]["time_ratio"] = 1.01
    sit["fid_overhead"]["bf16-mixed + compile"]["fraction"] = 0.04
    text = "\n".join(bench_gpu.sections(results))
    assert "No GPU run" not in text and "CPU check" not in text
    assert "**NVIDIA H100 80GB HBM3** (79 GiB, compute capability 9.0)" in text and "CUDA 12.8" in text
    assert "MFU against 989 TFLOP/s" in text and "| 55.0% |" in text
    verdicts = dict((target, ok) for target, ok, _ in bench_gpu.targets(results))
    assert verdicts["SiT-XL/2 + IG, bf16-mixed + compile: MFU >= 50%"] is True
    assert verdicts["SiT-XL/2 + IG: exit head <= 1% of the step time"] is True
    assert verdicts["SiT-XL/2 + IG: IG adds no forward pass and <= 3% sampling time"] is True
    assert verdicts["SiT-XL/2 + IG: FID-10k <= 10% of the training time between two"] is True
    stream, used = sit["streaming"], bench_gpu.consumption(sit["training"])
    assert verdicts["SiT-XL/2 + IG: posterior streaming >= 5x one GPU's consumption"] is \
        (stream["default_rate"] / used[1] >= 5)
    assert "- SiT-XL/2 + IG, bf16-mixed + compile: MFU >= 50%: **met** (best 55.0%)" in text
    results["env"]["peak_tflops"] = None  # a device outside the table
    for r in sit["training"]["rows"]:
        r["mfu"] = None
    text = "\n".join(bench_gpu.sections(results))
    assert "an unknown peak (device not in the table): MFU unknown" in text
    assert "MFU >= 50%: not measured" in text


def test_fid_overhead_is_the_callbacks_schedule_against_the_training_steps_between():
    fid = {"callback": {"num_samples": 10_000, "batch_size": 125, "every_n_steps": 100_000,
                        "reference_max_samples": 50_000},
           "batch": 125, "per_setting": {"none": {"seconds": 2.0}, "ig": {"seconds": 2.0}, "ig_cfg": {"seconds": 3.4}},
           "decode_s_per_image": 0.001, "inception_gflops": 11.4, "sample_gflops": 11_400.0}
    out = bench_gpu.fid_overhead(fid, 0.2, {"world": 8}, bench_gpu.Plan("cuda"))
    assert (out["per_rank"], out["batches"]) == (1250, 10)
    assert out["sampling_s"] == pytest.approx(10 * (2.0 + 2.0 + 3.4))
    assert out["decode_s"] == pytest.approx(3 * 1250 * 0.001) and out["reference_once_s"] == pytest.approx(6.25)
    assert out["fraction"] == pytest.approx((74 + 3.75) / 20_000) and out["inception_share"] == pytest.approx(1e-3)
    assert math.isclose(out["train_s"], 20_000)


class _DeviceLimit(bench_gpu.TrainingStep):
    """The real tiny training step on a device that runs out of memory above ``limit`` samples, as a GPU does."""

    limit = 16

    def __call__(self, x, y, clock=None):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().__call__(x, y, clock)


def test_the_largest_batch_is_found_by_doubling_until_out_of_memory_and_the_budget_skips_by_name():
    config = bench_gpu.MODELS["SiT-XL/2 + IG"][0]
    plan = bench_gpu.Plan.tiny_cpu()
    plan.batch_cap = 256
    budget = bench_gpu.Budget(60, echo=lambda line: None)
    module = bench_gpu.build(bench_gpu.paper_model(config, tiny=True), "cpu")
    module.train_generator = torch.Generator().manual_seed(0)
    step = _DeviceLimit(module, module.configure_optimizers(), False, 1.0, None)
    assert bench_gpu.largest_batch(step, 2, plan, budget, "tiny") == (16, False)  # 4, 8, 16 fit; 32 does not
    assert all(p.grad is None for p in module.parameters())  # the failed step's gradients are gone
    plan.batch_cap = 8
    assert bench_gpu.largest_batch(step, 2, plan, budget, "tiny") == (8, True)  # stopped by the cap
    assert not bench_gpu.Budget(0, echo=lambda line: None).allows("compile", 1)
    spent = bench_gpu.Budget(0, echo=lambda line: None)
    spent.allows("SiT-XL/2 + IG bf16-mixed + compile", 150)
    assert spent.skipped == ["SiT-XL/2 + IG bf16-mixed + compile (needs ~150 s, 0 s left)"]
