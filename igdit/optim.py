"""Optimisers and learning-rate schedules igdit adds to torch's (the experiment chooses by ``class_path``)."""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt, restricted_number_type

from igdit.compat import torch_muon
from igdit.config import ConfigError


class LinearWarmup(torch.optim.lr_scheduler.LambdaLR):
    """lr x min(1, (step + 1) / warmup_steps): a linear ramp over the first warmup_steps optimiser steps, then
    constant (the SiT/REPA recipes use none; the digits default warms up for 100 steps). torch's LinearLR
    says the same with start_factor 1 / warmup_steps and total_iters warmup_steps - 1."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: PositiveInt = 1):
        self.warmup_steps = int(warmup_steps)
        super().__init__(optimizer, lambda step: min(1.0, (step + 1) / self.warmup_steps))


# ---- Muon with an auxiliary AdamW (LightningDiT's optimiser) -------------------------------------------
MuonLrAdjust = Literal["official", "match_rms_adamw", "original"]
# A momentum or an Adam beta: in [0, 1) (1 would never forget).
Beta = restricted_number_type("Beta", float, [(">=", 0), ("<", 1)])


def muon_lr_ratio(rows: int, cols: int, adjust: str) -> float:
    """Factor on the learning rate of a Muon update of a (rows, cols) matrix (rows = fan-out).

    ``match_rms_adamw`` (Moonshot): 0.2 sqrt(max(rows, cols)), so Muon reuses an AdamW learning rate.
    ``original`` (Keller Jordan): sqrt(max(1, rows / cols)).
    ``official``: their product, what LightningDiT+IG's ``muon_new.py`` applies: ``muon_update`` scales the
    orthogonalised update by sqrt(max(1, rows / cols)) and ``adjust_lr_for_muon`` multiplies lr by
    0.2 sqrt(max(A, B)) with (A, B) = ``p.shape[:2]`` (the same as (rows, cols) unless a conv kernel is wider
    than 1 and its input side is the larger one: never in SiT or LightningDiT).
    """
    rms, original = 0.2 * math.sqrt(max(rows, cols)), math.sqrt(max(1.0, rows / cols))
    return {"match_rms_adamw": rms, "original": original, "official": rms * original}[adjust]


class MuonWithAuxAdam(torch.optim.Optimizer):
    """Muon for every parameter with >= 2 dims, AdamW for the rest, as LightningDiT+IG trains (docs/method.md §4.2).

    The split is the official one (``LightningDiT/train.py``): ``p.ndim >= 2`` goes to Muon, i.e. every
    weight matrix including the patch embedding (a (D, C, p, p) conv, orthogonalised as a (D, C p p)
    matrix), the label-embedding table, the adaLN and the final/exit head projections; biases and RMSNorm
    gains (1-D) go to AdamW. (Keller Jordan's recipe keeps embeddings and heads on AdamW; the official code
    does not.) The module passes its trainable parameters only, so the frozen ``pos_embed`` is not decayed
    here, while the official loop zero-fills its missing gradient and lets Muon's weight decay shrink it.

    Muon (torch's own update, ``torch.optim.Muon``'s functional form, on a 2-D view of each parameter):
    momentum ``momentum`` with Nesterov, ``ns_steps`` Newton–Schulz iterations in bfloat16, decoupled weight
    decay p <- p (1 - lr weight_decay), then p <- p - lr * muon_lr_ratio(shape, adjust_lr) * O.
    AdamW: lr ``adam_lr`` (default ``lr``), ``adam_betas``, ``adam_eps``, ``adam_weight_decay``.

    Official values (defaults here): lr 2e-4 for both, momentum 0.95, Nesterov, 5 steps, Muon weight decay
    0.01, adjust ``official``; Adam betas (0.9, 0.95) (``beta2`` in the yaml), eps 1e-8, no weight decay.

    params: tensors, (name, tensor) pairs (torch keeps the names in ``param_groups``) or parameter groups
    (dicts); a group may set ``use_muon`` itself, otherwise it is split by ``ndim``. Groups keep the option
    names above (``lr``, ``weight_decay``, ``betas``, ``eps``, ...), so LR schedulers scale both optimisers'
    rates and ``state_dict`` / ``load_state_dict`` are torch's own.
    """

    def __init__(self, params, lr: PositiveFloat = 2e-4, momentum: Beta = 0.95, nesterov: bool = True,
                 ns_steps: PositiveInt = 5, weight_decay: NonNegativeFloat = 0.01, adjust_lr: MuonLrAdjust = "official",
                 adam_lr: Optional[PositiveFloat] = None, adam_betas: tuple[Beta, Beta] = (0.9, 0.95),
                 adam_eps: PositiveFloat = 1e-8, adam_weight_decay: NonNegativeFloat = 0.0):
        muon = {"lr": float(lr), "momentum": float(momentum), "nesterov": bool(nesterov), "ns_steps": int(ns_steps),
                "weight_decay": float(weight_decay), "adjust_lr": adjust_lr}
        adam = {"lr": float(adam_lr if adam_lr is not None else lr), "betas": tuple(float(b) for b in adam_betas),
                "eps": float(adam_eps), "weight_decay": float(adam_weight_decay)}
        groups = []
        for group in _as_groups(params):
            items = list(group.pop("params"))
            if "use_muon" in group:
                groups.append({**(muon if group["use_muon"] else adam), **group, "params": items})
                continue
            for use_muon in (True, False):
                chosen = [item for item in items if (_tensor(item).ndim >= 2) == use_muon]
                if chosen:
                    groups.append({**(muon if use_muon else adam), **group, "params": chosen, "use_muon": use_muon})
        if not groups:
            raise ConfigError("model.optimizer", "MuonWithAuxAdam", "got no parameters to optimise")
        super().__init__(groups, {})

    @torch.no_grad()
    def step(self, closure=None):
        """One optimiser step on every group (Muon groups, then AdamW groups, in group order)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (self._muon_step if group["use_muon"] else self._adam_step)(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        muon = torch_muon()  # the functional form torch.optim.Muon.step runs

        for p in group["params"]:
            if p.grad is None:
                continue
            matrix = p.view(p.shape[0], -1)  # a conv (D, C, k, k) as (D, C k k), as the official code
            grad = p.grad.reshape(matrix.shape)
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            # torch scales lr by one adjust rule; "official" is the product of two, so the second factor goes
            # into lr and out of weight_decay again (torch decays by lr * weight_decay, unscaled).
            extra = math.sqrt(max(1.0, matrix.shape[0] / matrix.shape[1])) if group["adjust_lr"] == "official" else 1.0
            rule = "match_rms_adamw" if group["adjust_lr"] == "official" else group["adjust_lr"]
            muon([matrix], [grad], [state["momentum_buffer"]], lr=group["lr"] * extra,
                 weight_decay=group["weight_decay"] / extra, momentum=group["momentum"], nesterov=group["nesterov"],
                 ns_coefficients=MUON_NS_COEFFICIENTS, eps=1e-7, ns_steps=group["ns_steps"], adjust_lr_fn=rule,
                 has_complex=False)

    def _adam_step(self, group: dict) -> None:
        from torch.optim.adamw import adamw  # the functional form torch.optim.AdamW.step runs

        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:  # torch.optim.AdamW's state layout
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if params:
            beta1, beta2 = group["betas"]
            adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, beta1=beta1, beta2=beta2,
                  lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


MUON_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic of Keller Jordan's Muon, also muon_new.py's


def _tensor(item) -> torch.Tensor:
    return item[1] if isinstance(item, tuple) else item


def _as_groups(params) -> list[dict]:
    """torch's accepted ``params`` forms (tensors, (name, tensor) pairs, or group dicts) as a list of groups."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors, (name, tensor) pairs or parameter groups")
    params = list(params)
    if params and isinstance(params[0], dict):
        return [dict(g) for g in params]
    return [{"params": params}]
