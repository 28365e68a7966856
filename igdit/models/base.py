"""What every backbone offers (docs/design.md, contracts 1, 2 and 7), and the registry of named sizes.

A backbone family subclasses ``Backbone``, names itself (``family``), lists its sizes (``sizes``: DiT's
``DiT_models`` dict, e.g. ``"XL/2"`` -> depth, width, heads, patch) and builds its layers. Defining the class
registers every size as ``"<family>-<size>"`` (``"SiT-XL/2"``), so a family in a new file needs no edit
elsewhere: an experiment names it by ``class_path`` and its ``size``.

The forward pass is written once, here: embed -> blocks (recording the hidden states and exit-head outputs the
caller asked for, stopping early when nothing later is needed) -> final head. Families whose own time runs the
other way (LightningDiT: t = 0 is noise, the network predicts data - noise) set ``noise_at_zero``; ``forward``
is then the one place that converts (docs/design.md, contract 1): it calls the network at 1 - t and negates the
velocities it returns. Nothing downstream sees another convention.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.nn as nn

from igdit.config import ConfigError
from igdit.models.output import DiTOutput

# "<family>-<size>" -> (family class, size); filled by Backbone.__init_subclass__.
BACKBONES: dict[str, tuple[type["Backbone"], str]] = {}


def exit_head_name(idx: int, exits: Sequence[int]) -> str:
    """Attribute name of the exit head after block ``idx`` (1-based) when ``exits`` are configured.

    One exit: ``final_layer_xr`` (the official checkpoints' name, SiT and LightningDiT alike). Several:
    ``final_layer_xr_<idx>``.
    """
    return "final_layer_xr" if len(exits) == 1 else f"final_layer_xr_{idx}"


def check_exits(exits: Sequence[int], depth: int) -> tuple[int, ...]:
    """Exit blocks as a sorted tuple; one-line ConfigError unless each is a distinct 1-based index in [1, depth-1]."""
    exits = list(exits)
    for idx in exits:
        if isinstance(idx, bool) or not isinstance(idx, int) or not 1 <= idx <= depth - 1:
            raise ConfigError("model.backbone.exits", idx,
                              f"exit blocks are 1-based indices in [1, {depth - 1}] for depth {depth}")
    if len(set(exits)) != len(exits):
        raise ConfigError("model.backbone.exits", exits, "each exit block may appear only once")
    return tuple(sorted(exits))


class Backbone(nn.Module):
    """A diffusion transformer predicting the velocity v(x_t, t, y), t = 1 noise (the project's time).

    A family's constructor calls ``configure`` first (the named size, its overrides and the checks every family
    shares; it sets ``size``, ``input_size`` (latent side H = W), ``patch_size`` p, ``in_channels`` C,
    ``num_classes`` (label ``num_classes`` is the null label), ``depth``, ``hidden_size`` D, ``num_heads`` and
    ``exit_indices`` (1-based blocks with an IG exit head)), sets ``out_channels``, builds its embedders and
    ``blocks`` (an ``nn.ModuleList``), then ``add_heads`` (one ``make_head()`` per exit, named by
    ``exit_head_name``, then ``final_layer``). It implements ``embed`` and ``make_head`` and may override
    ``run_block``.
    """

    family: ClassVar[str] = ""
    sizes: ClassVar[dict[str, dict[str, Any]]] = {}
    noise_at_zero: ClassVar[bool] = False  # True: the family's own time has t = 0 as noise (converted in forward)

    input_size: int
    patch_size: int
    in_channels: int
    out_channels: int
    num_classes: int
    depth: int
    hidden_size: int
    exit_indices: tuple[int, ...]
    size: str

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.family:
            for size in cls.sizes:
                BACKBONES[f"{cls.family}-{size}"] = (cls, size)

    # ---- what callers read --------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The registered name, e.g. ``"SiT-XL/2"``."""
        return f"{self.family}-{self.size}"

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the latents the backbone denoises."""
        return (self.in_channels, self.input_size, self.input_size)

    @property
    def grid_size(self) -> int:
        """Tokens per side; T = grid_size ** 2 tokens."""
        return self.input_size // self.patch_size

    def exit_head(self, idx: int) -> nn.Module:
        """The exit head reading the residual stream after block ``idx`` (1-based)."""
        if idx not in self.exit_indices:
            raise ValueError(f"no exit head after block {idx!r}; this model has exits {list(self.exit_indices)}")
        return getattr(self, exit_head_name(idx, self.exit_indices))

    # ---- what every family's constructor shares --------------------------------------------------------
    def configure(self, size: str, *, input_size: int, in_channels: int, num_classes: int, exits: Sequence[int],
                  depth: Optional[int] = None, hidden_size: Optional[int] = None,
                  num_heads: Optional[int] = None) -> None:
        """The named size (``sizes[size]``) with ``depth`` / ``hidden_size`` / ``num_heads`` overriding it, checked
        (the patch divides the input, the heads divide the width, the width divides by 4 for the 2-D sin-cos
        position embedding, the exits lie inside the depth), set on the backbone."""
        arch = size_of(type(self), size)
        arch.update({k: v for k, v in dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads).items()
                     if v is not None})
        patch_size, depth, hidden_size, num_heads = (arch[k] for k in ("patch_size", "depth", "hidden_size",
                                                                        "num_heads"))
        if input_size % patch_size:
            raise ConfigError("model.backbone.input_size", input_size, f"must be divisible by the patch size {patch_size}")
        if hidden_size % num_heads:
            raise ConfigError("model.backbone.hidden_size", hidden_size, f"must be divisible by num_heads {num_heads}")
        if hidden_size % 4:
            raise ConfigError("model.backbone.hidden_size", hidden_size,
                              "must be divisible by 4 (2-D sin-cos position embedding)")
        self.size, self.input_size, self.patch_size, self.in_channels = size, input_size, patch_size, in_channels
        self.hidden_size, self.depth, self.num_heads, self.num_classes = hidden_size, depth, num_heads, num_classes
        self.exit_indices = check_exits(exits, depth)

    def add_heads(self) -> None:
        """One output head per exit (``exit_head_name``), then ``final_layer``: each from ``make_head``."""
        for idx in self.exit_indices:
            setattr(self, exit_head_name(idx, self.exit_indices), self.make_head())
        self.final_layer = self.make_head()

    # ---- what families implement --------------------------------------------------------------------
    def make_head(self) -> nn.Module:
        """An output head (the final layer, or an IG exit head: the same design with its own weights) mapping
        tokens (N, T, D) and conditioning (N, D) to patch tokens (N, T, p * p * out_channels)."""
        raise NotImplementedError

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, C, H, W), t: (N,) in the family's own time, y: (N,) -> (tokens (N, T, D), conditioning (N, D))."""
        raise NotImplementedError

    def run_block(self, index: int, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Block ``index`` (0-based) on tokens (N, T, D) with conditioning c (N, D)."""
        return self.blocks[index](tokens, c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (N, h*w, p*p*C) -> (N, C, h*p, w*p); each token's features ordered (p, q, C)."""
        n, h, p, c = x.shape[0], self.grid_size, self.patch_size, self.out_channels
        x = x.reshape(n, h, h, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(n, c, h * p, h * p)

    # ---- the forward pass, written once -------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, exits: Sequence[int] = (),
                hidden: Sequence[int] = (), stop_after: Optional[int] = None) -> DiTOutput:
        """x: (N, C, H, W) latents; t: (N,) in [0, 1], **1 = noise**; y: (N,) long in [0, num_classes].

        exits: blocks whose exit head to run (each must have one); hidden: blocks (1-based, in [1, depth])
        whose output tokens (N, T, D) to return; stop_after: run blocks 1..stop_after only and no final head
        (``final`` is then None; a teacher that needs one block's features stops there). Nothing else is
        computed. Velocities are in the project's convention whatever the family's own.
        """
        exits, hidden = set(exits), set(hidden)
        missing = sorted(exits - set(self.exit_indices))
        if missing:
            raise ValueError(f"no exit head after block(s) {missing}; this model has exits {list(self.exit_indices)}")
        bad = sorted(i for i in hidden if not (isinstance(i, int) and 1 <= i <= self.depth))
        if bad:
            raise ValueError(f"hidden blocks must be 1-based indices in [1, {self.depth}], got {bad}")
        last = self.depth if stop_after is None else stop_after
        if not 1 <= last <= self.depth or any(i > last for i in exits | hidden):
            raise ValueError(f"stop_after {stop_after} must lie in [1, {self.depth}] and after every requested block")
        if self.noise_at_zero:
            t = 1 - t  # the family's own time (contract 1: converted here and nowhere else)
        tokens, c = self.embed(x, t, y)
        exit_out, hidden_out = {}, {}
        for i in range(1, last + 1):
            tokens = self.run_block(i - 1, tokens, c)
            if i in hidden:
                hidden_out[i] = tokens
            if i in exits:
                exit_out[i] = self.unpatchify(self.exit_head(i)(tokens, c))
        final = self.unpatchify(self.final_layer(tokens, c)) if stop_after is None else None
        if self.noise_at_zero:  # the family predicts data - noise; the project's velocity is noise - data
            final = None if final is None else -final
            exit_out = {i: -v for i, v in exit_out.items()}
        return DiTOutput(final=final, exits=exit_out, hidden=hidden_out)


def size_of(family: type[Backbone], size: str, field: str = "model.backbone.size") -> dict[str, Any]:
    """The architecture of a registered size, or a one-line ConfigError listing the family's sizes."""
    if size not in family.sizes:
        raise ConfigError(field, size, f"{family.family} sizes are " + ", ".join(family.sizes))
    return dict(family.sizes[size])


def build_backbone(name: str, field: str = "model.backbone", **options) -> Backbone:
    """The backbone registered as ``name`` (e.g. ``"SiT-XL/2"``), built with ``options`` (input_size, exits, ...)."""
    if name not in BACKBONES:
        raise ConfigError(field, name, "choose one of " + ", ".join(BACKBONES))
    family, size = BACKBONES[name]
    return family(size=size, **options)

