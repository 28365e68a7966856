"""The projector MLP that alignment terms put on a hidden state (REPA's ``build_mlp``, reused by ST)."""
from __future__ import annotations

import torch.nn as nn


def mlp_projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear(in, hidden) - SiLU - Linear(hidden, hidden) - SiLU - Linear(hidden, out), applied per token
    ((N, T, in) -> (N, T, out)); xavier-uniform weights and zero biases, as the official DiT/SiT init."""
    mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim), nn.SiLU(),
                        nn.Linear(hidden_dim, out_dim))
    xavier_init(mlp)
    return mlp


def xavier_init(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear in ``module``."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
