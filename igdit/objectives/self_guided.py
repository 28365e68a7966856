"""Self-Transcendence stage 2, self-guided representation (ST paper §3.3, Eqs. 2-4): a fresh model's block-n
features regress the CFG-sharpened block-m features of the frozen stage-1 model, for the first steps only."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal, Optional

import torch
from jsonargparse.typing import NonNegativeFloat, PositiveInt

from igdit.config import ConfigError, UnitInterval
from igdit.models.loading import load_backbone
from igdit.objectives.base import (
    Frozen,
    LossInputs,
    LossTerm,
    check_block,
    file_digest,
    mlp,
    per_sample_loss,
)

# What a teacher must share with the student, in the order it is checked: (attribute, what it means).
MUST_FIT = (("family", "family"), ("hidden_size", "hidden width"), ("in_channels", "latent channels"),
            ("input_size", "latent size"), ("patch_size", "patch size (token grid)"),
            ("num_classes", "number of classes (its null label)"))


class SelfGuidedLoss(LossTerm):
    """|| MLP(h_n) - f_g ||^2 per sample (mean over T x D); f_g = f_u + omega (f_c - f_u) (Eq. 3).

    h_n: the student's tokens (N, T, D) after block ``student_block``; MLP: D -> projector_dim -> projector_dim
    -> D (SiLU). f_c, f_u: the frozen teacher's raw tokens after block ``teacher_block`` at the student's own
    x_t and t, with the labels before class dropout (f_c) and the null label (f_u), in one batched pass that
    stops at that block. The teacher runs on the samples that count (``counted``): under t_range_mode
    ``per_sample`` (the default) those inside t_range, under ``official_broadcast`` (what the public code computes,
    and what its published numbers come from) every sample, about 3.3x the teacher passes at t_range [0.4, 0.7].

    teacher_ckpt: an igdit checkpoint of a stage-1 run (``VAEAlignLoss``); loaded in ``setup`` (at fit start),
        never trained, averaged or saved (its path and sha256 go into the hyper-parameters instead).
    teacher_weights: "raw" (the optimiser's weights, ``current_model_state``: the public code loads
        ``ckpt['model']``) or "ema" (the checkpoint's ``state_dict``).
    omega: the feature CFG scale (30 for SiT in the paper and script; 0 gives f_u, 1 gives f_c).
    teacher_precision: "float32" (default): the teacher pass runs in float32 with autocast off, as the public code
        (its teacher is not prepared by accelerate, so it never runs in the mixed precision of the student);
        omega = 30 multiplies the rounding of f_c - f_u. "trainer": in the trainer's precision (bf16-mixed
        autocast in the paper-scale YAMLs), faster on tensor cores and not what produced the published numbers.
    stop_step: the step from which the term is off (then no teacher pass runs); the paper's 20 epochs (B)
        / 10 epochs (L, XL), the public code's 100,000 steps.
    Defaults as the public SiT-B/2 script: student block 6 = n/2, teacher block 8 = 2n/3, weight 0.5,
    t_range [0.4, 0.7] (t = 1 is noise).
    """

    def __init__(self, teacher_ckpt: Optional[str] = None, teacher_weights: Literal["raw", "ema"] = "raw",
                 student_block: PositiveInt = 6, teacher_block: PositiveInt = 8, omega: NonNegativeFloat = 30.0,
                 projector_dim: PositiveInt = 2048, teacher_precision: Literal["float32", "trainer"] = "float32",
                 weight: NonNegativeFloat = 0.5, t_range: UnitInterval = (0.4, 0.7), **kwargs):
        super().__init__(weight=weight, t_range=t_range, **kwargs)
        self.teacher_ckpt, self.teacher_weights = teacher_ckpt, teacher_weights
        self.student_block, self.teacher_block = int(student_block), int(teacher_block)
        self.omega, self.projector_dim = float(omega), int(projector_dim)
        self.teacher_precision = teacher_precision
        self.teacher: Optional[Frozen] = None
        self.student: dict = {}

    def attach(self, backbone, transport) -> None:
        super().attach(backbone, transport)
        check_block(self.field("student_block"), self.student_block, backbone.depth)
        # The student's shape, to check the teacher against when it is loaded (not the backbone: no submodule).
        self.student = {key: getattr(backbone, key) for key, _ in MUST_FIT} | {"name": backbone.name}
        self.projector = mlp(backbone.hidden_size, self.projector_dim, self.projector_dim, backbone.hidden_size)

    def setup(self, device: torch.device, datamodule=None) -> None:
        """Load the teacher from ``teacher_ckpt`` and check that it fits the student (one-line ConfigErrors)."""
        if self.teacher is not None:
            return
        field = self.field("teacher_ckpt")
        if self.teacher_ckpt is None:
            raise ConfigError(field, None, "stage 2 needs the frozen stage-1 model: pass an igdit checkpoint of a "
                                           f"stage-1 run (--{field} "
                                           "runs/<experiment>/<run>/checkpoints/last.ckpt) or chain both stages "
                                           "(igdit fit --config experiments/st_digits.yaml)")
        path = Path(self.teacher_ckpt)
        teacher = load_backbone(path, field, "cpu", weights=self.teacher_weights)
        self.check_teacher(teacher)
        self.teacher = Frozen(teacher, str(path.resolve()), file_digest(path))

    def check_teacher(self, teacher) -> None:
        """One-line ConfigError at the first way the teacher backbone does not fit the student."""
        for key, meaning in MUST_FIT:
            theirs, ours = getattr(teacher, key), self.student[key]
            if theirs != ours:
                raise ConfigError(self.field("teacher_ckpt"), self.teacher_ckpt,
                                  f"the teacher ({teacher.name}) does not fit the student ({self.student['name']}): "
                                  f"its {meaning} is {theirs}, the student's {ours}")
        if self.teacher_block > teacher.depth:
            raise ConfigError(self.field("teacher_block"), self.teacher_block,
                              f"the teacher ({teacher.name}, {self.teacher_ckpt}) has blocks 1..{teacher.depth}")

    def frozen_networks(self) -> dict[str, dict]:
        if self.teacher is None:
            return {}
        return {"teacher": self.teacher.describe() | {"weights": self.teacher_weights}}

    def hidden_needed(self, step: int) -> tuple[int, ...]:
        return (self.student_block,) if self.active(step) else ()

    @torch.no_grad()
    def guided_features(self, x_t: torch.Tensor, t: torch.Tensor, y_clean: torch.Tensor) -> torch.Tensor:
        """f_g (n, T, D) from one teacher pass on [x_t; x_t] with labels [y_clean; null] up to teacher_block."""
        if self.teacher is None:  # fit loads it in setup; `igdit validate` of an early stage-2 checkpoint gets here
            self.setup(x_t.device)
        teacher = self.teacher.get(x_t.device)
        null = torch.full_like(y_clean, self.student["num_classes"])
        m = self.teacher_block
        in_float32 = self.teacher_precision == "float32"
        if in_float32:
            x_t, t = x_t.float(), t.float()
        with torch.autocast(x_t.device.type, enabled=False) if in_float32 else contextlib.nullcontext():
            out = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y_clean, null]), hidden=(m,),
                          stop_after=m)
        f_c, f_u = out.hidden[m].chunk(2)
        return f_u + self.omega * (f_c - f_u)

    def per_sample(self, inputs: LossInputs) -> torch.Tensor:
        """(N,) losses; the samples that do not count (``counted``) are 0 and the teacher never sees them."""
        prediction = self.projector(inputs.output.hidden[self.student_block])
        counted = self.counted(inputs.t)
        target = torch.zeros_like(prediction, dtype=torch.float32)
        if counted.all():
            target = self.guided_features(inputs.x_t, inputs.t, inputs.y_clean).float()
        elif counted.any():
            target[counted] = self.guided_features(inputs.x_t[counted], inputs.t[counted],
                                                   inputs.y_clean[counted]).float()
        if counted.any():  # omega = 30 makes targets far larger than the hidden states; worth watching
            self.logged["f_g_norm"] = target[counted].norm(dim=-1).mean()
        return per_sample_loss(prediction, target) * counted
