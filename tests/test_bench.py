"""`python -m igdit.bench --only data` rewrites its own sections of BENCHMARKS.md and keeps the others."""
import pytest

from igdit.bench.core import SIT_XL2_SAMPLES_PER_GPU, _merge_sections, data_sections


def _sections(rate: float) -> list[str]:
    stream = {"workers": {n: {"samples_per_sec": rate, "per_worker": rate / n, "min": rate, "max": rate}
                          for n in (1, 2)},
              "batch": 256, "batches": 10, "samples": 1000, "per_shard": 100, "shard_mib": 1.0,
              "sample_shape": (4, 32, 32), "rounds": 3}
    encode = {"crop_images_per_sec": 100.0, "crop_images": 8, "sd_vae_images_per_sec": 0.5, "sd_vae_batch": 2,
              "sd_vae_encode_gflops": 272.7, "tiny_vae_images_per_sec": 50.0, "tiny_vae_batch": 16}
    return ["## Data throughput\n\nmeasured today\n"] + data_sections(stream, encode)


def test_data_sections_replace_their_old_numbers_and_keep_every_other_section():
    report = ("# Benchmarks\n\nMeasured by make bench.\n\n## Exit head cost (target: <= 1%)\n\nratio 1.0165\n\n"
              "## Default run (targets: ...)\n\n| training time | 438 s |\n")
    first = _merge_sections(report, _sections(5_000.0))
    assert "ratio 1.0165" in first and "| training time | 438 s |" in first
    assert "| 1 | 5,000 (5,000-5,000) | 5,000 |" in first
    second = _merge_sections(first, _sections(9_000.0))
    assert "| 1 | 9,000 (9,000-9,000) | 9,000 |" in second and "5,000" not in second
    for title in ("## Data throughput", "## Streaming latents", "## Encoding for `igdit data build`", "## Exit head"):
        assert second.count(title) == 1
    assert second == _merge_sections(second, _sections(9_000.0))


def test_the_consumption_figure_is_the_flops_bound_and_the_ratio_uses_it():
    assert round(SIT_XL2_SAMPLES_PER_GPU) == round(989e12 * 0.5 / (3 * 118.6e9)) == 1390
    text = "\n".join(_sections(13_900.0))
    assert "One worker gives **10.0x** the assumed consumption" in text and "needs 2 workers per GPU" in text


def test_a_steps_counted_flops_are_its_networks_forward_and_backward():
    import torch

    from igdit.bench.terms import step_flops
    from helpers import tiny_module

    plain = tiny_module(backbone={"exits": []}, terms={"diffusion": {"class_path": "igdit.objectives.DiffusionLoss"}})
    x, y = torch.randn(16, *plain.latent_shape), torch.randint(0, 10, (16,))
    counted = step_flops(plain, x, y)
    assert abs(counted / plain.training_flops(16) - 1) < 1e-3  # attention included; the loss is a rounding error
    layersync = tiny_module(backbone={"exits": []}, terms={
        "diffusion": {"class_path": "igdit.objectives.DiffusionLoss"},
        "layersync": {"class_path": "igdit.objectives.LayerSyncLoss", "init_args": {"block": 1, "target_block": 4}}})
    layersync.load_state_dict(plain.state_dict(), strict=False)
    # the counter counts matrix products and convolutions: LayerSync's cosines add none, an exit head adds its own
    assert step_flops(layersync, x, y) == counted
    with_exit = tiny_module()
    assert abs(step_flops(with_exit, x, y) / with_exit.training_flops(16) - 1) < 1e-3
    assert step_flops(with_exit, x, y) > counted


def test_the_loss_term_section_reports_every_arm_and_the_paper_scale_rows():
    from igdit.bench.terms import sections

    digits = {"steps": 25, "rounds": 3, "arms": {
        "plain": {"step_ms": 40.0, "time_ratio": 1.0, "gflops": 15.0, "flops_ratio": 1.0},
        "sra": {"step_ms": 52.0, "time_ratio": 1.3, "gflops": 19.2, "flops_ratio": 1.28}}}
    paper = {"forward_gflops": {"B/2": 46.0, "XL/2": 237.2}, "rows": {
        "sra teacher": {"B/2": {"gflops": 30.7, "of_forward": 0.667}, "XL/2": {"gflops": 169.4, "of_forward": 0.714}}}}
    text = "\n".join(sections(digits, paper))
    assert "| sra | 52.0 | 1.300 | 19.20 | 1.280 |" in text
    assert "| sra teacher | 30.7 (0.67) | 169.4 (0.71) |" in text and "SiT-XL/2 237.2 GFLOPs" in text


def test_the_cli_part_reports_help_start_times_in_its_own_section():
    from igdit.bench.core import PARTS, help_section

    result = {"rounds": 3, "load_before": 1.5, "date": "2026-12-04", "rows": [
        {"command": "igdit --help", "cache": "empty", "wall_s": 0.2, "cpu_s": 0.1},
        {"command": "igdit fit --help", "cache": "filled", "wall_s": 0.25, "cpu_s": 0.12}]}
    text = "\n".join(help_section(result))
    assert text.startswith("## Command-line start (target: `igdit --help` and a subcommand's `--help` under 2 s")
    assert "| `igdit fit --help` | filled | 0.25 | 0.12 |" in text and "load average 1.5" in text
    assert "cli" in PARTS
    report = _merge_sections("# Benchmarks\n\n## Exit head cost (target: <= 1%)\n\nratio 1.0165\n", help_section(result))
    assert "ratio 1.0165" in report and report.count("## Command-line start") == 1


@pytest.mark.slow
def test_the_hand_loop_takes_the_same_steps_as_igdit_fit_bit_for_bit(digits_root, tmp_path):
    """The loop benchmark compares equal work: after 6 steps from the same seed, the hand-written loop's weights and
    EMA equal those `igdit fit` saved in last.ckpt exactly, and the evaluation callbacks are not in the fit."""
    import torch
    import yaml

    from igdit.bench.loop import _loop_config, hand_loop, lightning_loop
    from helpers import REPO

    config = str(REPO / "experiments/default.yaml")
    prepared = _loop_config(config, steps=6, start=1, scratch=tmp_path)
    kept = [c["class_path"] for c in yaml.safe_load(prepared.read_text())["trainer"]["callbacks"]]
    assert not any(k.endswith(("FIDCallback", "SampleGrid")) for k in kept) and kept[-1].endswith("StepClock")
    lightning_seconds, last = lightning_loop(prepared, str(digits_root))
    hand_seconds, module, ema = hand_loop(config, str(digits_root), steps=6, start=1)
    assert lightning_seconds > 0 and hand_seconds > 0
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 6
    for trained, reference in ((ema.module.state_dict(), saved["state_dict"]),
                               (module.state_dict(), saved["current_model_state"])):
        assert set(trained) == set(reference)
        assert all(torch.equal(trained[k], reference[k]) for k in trained), \
            max((trained[k] - reference[k]).abs().max().item() for k in trained)


def test_the_loop_section_reports_both_loops_and_the_ratio():
    from igdit.bench.loop import loop_section

    text = "\n".join(loop_section({"measured": "today", "config": "experiments/default.yaml", "steps": 150, "timed_steps": 119,
                                   "rounds": 3, "batch": 128, "lightning_ms": 170.0, "hand_ms": 160.0,
                                   "ratio": 0.941, "ratios": [0.93, 0.941, 0.95],
                                   "kept_callbacks": ["EMAWeightAveraging", "DivergenceGuard"]}))
    assert "| hand-written (no Trainer) | 160.0 |" in text and "| `igdit fit` (Lightning) | 170.0 |" in text
    assert "**0.941x**" in text and "0.930, 0.941, 0.950" in text and "(EMAWeightAveraging, DivergenceGuard)" in text
    assert "Measured today by `python -m igdit.bench --only loop`" in text
    report = _merge_sections("# Benchmarks\n\n## Exit head cost (target)\n\nratio 1.02\n", text.split("\n"))
    assert _merge_sections(report, text.split("\n")) == report and report.count("## Training loop") == 1
    assert "Measured today" in report and "ratio 1.02" in report
