"""`make bench` (``python -m igdit.bench``): the speed and memory targets, measured side by side and written into
BENCHMARKS.md. ``core``: the training step, the exit head, sampling per guidance setting, FID overhead and memory,
sweep trials, data streaming and the posterior moments' precision (and the command line); ``terms``: each loss
term's step time and FLOPs; ``lightningdit``: LightningDiT sampling and posterior streaming."""
