"""`make bench` (``python -m igdit.bench``): the speed and memory targets, measured side by side and written into
BENCHMARKS.md. ``core``: the training step, the exit head, sampling per guidance setting, FID overhead and memory,
sweep trials, data streaming and the posterior moments' precision (and the command line); ``terms``: each loss
term's step time and FLOPs; ``lightningdit``: LightningDiT sampling and posterior streaming; ``loop``: `igdit fit`
against a hand-written loop of the same steps; ``gpu``: the paper-scale figures on one accelerator."""
import os
import platform
import time


def machine() -> str:
    """This machine as the report names it: "<processor>, <n> cores, torch <version>"."""
    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def measured_on() -> str:
    """When and where a section was measured, and how busy the machine was: "<date> on <machine>, load average
    <1-minute load> before" (call it before the measurement starts)."""
    return f"{time.strftime('%Y-%m-%d')} on {machine()}, load average {os.getloadavg()[0]:.1f} before"
