"""A callback for the two-process DDP test (imported by the training processes via PYTHONPATH=tests).

Each rank writes rank<r>.json: a digest of every training sample it was given (float16 latent bytes and
label, as stored in the shards), the digest of its weights at the end of fit (the EMA weights: Lightning's
EMAWeightAveraging copies them into the model in on_train_end), and its step count.
"""
import hashlib
import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch


def sample_digest(latent: np.ndarray, label: int) -> str:
    return hashlib.sha1(latent.astype(np.float16).tobytes() + int(label).to_bytes(2, "little")).hexdigest()


def state_digest(state: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class RankProbe(pl.Callback):
    def __init__(self, out: str):
        self.out, self.seen = Path(out), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = batch
        self.seen += [sample_digest(x[i].numpy(), int(y[i])) for i in range(x.shape[0])]

    def on_fit_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        report = {"rank": trainer.global_rank, "world_size": trainer.world_size, "steps": trainer.global_step,
                  "seen": self.seen, "weights": state_digest(pl_module.state_dict()),
                  "threads": torch.get_num_threads()}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))
