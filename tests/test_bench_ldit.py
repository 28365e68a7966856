"""igdit.bench.lightningdit on a tiny model: the measurements run end to end and the report states what they measured."""
import pytest

from igdit.bench.lightningdit import exit_head_flops, posterior_streaming, sampling_throughput, sections


def test_exit_head_costs_a_fraction_of_a_percent_of_xl1():
    flops = exit_head_flops("XL/1")
    assert 1.0 < flops["ratio"] < 1.01
    assert 200 < flops["forward_gflops"] < 260  # 2 x multiply-adds of LightningDiT-XL/1 on 256 tokens


@pytest.mark.slow
def test_sampling_and_streaming_sections():
    sampling = sampling_throughput("T/1", batch=2, steps=2, rounds=1, device="cpu")
    s = sampling["settings"]
    assert s["none"]["nfe"] == s["ig 1.7"]["nfe"] == 4  # 2 full Heun steps: IG adds no evaluation
    assert s["none"]["rows_ratio"] == s["ig 1.7"]["rows_ratio"] == 1.0
    assert 1.0 < s["cfg 1.45 on [0, 0.81]"]["rows_ratio"] < 2.0  # doubled only inside the interval
    streaming = posterior_streaming(workers=(0,), batch=16, batches=3, samples=200, per_shard=50, rounds=1)
    assert streaming["formats"]["posterior"][0]["samples_per_sec"] > 0 and streaming["consumption_per_gpu"] > 0
    report = "\n".join(sections(sampling, streaming, sit_bound=1390.0))
    assert report.count("\n## ") == 1 and report.startswith("## LightningDiT-T/1 + IG sampling")
    assert "IG/none: **" in report and "posterior samples/s" in report and "SiT-XL/2 figure" in report
