"""IGDiTModule: injected parts, the training step, label dropout, term-owned and frozen weights, checkpoints."""
import copy

import pytest
import torch
import torch.nn as nn
from jsonargparse import ArgumentError

from igdit.config import ConfigError, one_line
from igdit.module import IGDiTModule, build_module
from igdit.objectives import Frozen, LossTerm, per_sample_loss

from helpers import model_config, tiny_module


class ProjectedAlignment(LossTerm):
    """A term with a projector of its own that also reads a frozen network (the shape of REPA / ST)."""

    def __init__(self, weight: float = 1.0, block: int = 1):
        super().__init__(weight)
        self.block = block

    def attach(self, backbone, transport) -> None:
        super().attach(backbone, transport)
        self.projector = nn.Linear(backbone.hidden_size, 3)
        torch.manual_seed(1)
        self.encoder = Frozen(nn.Linear(backbone.in_channels * backbone.patch_size ** 2, 3), "random", "none")

    def hidden_needed(self, step):
        return (self.block,)

    def per_sample(self, inputs):
        x = inputs.x.unfold(2, 2, 2).unfold(3, 2, 2).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
        return per_sample_loss(self.projector(inputs.output.hidden[self.block]), self.encoder.get(x.device)(x))


def _with_term(**term_args) -> IGDiTModule:
    terms = {"align": {"class_path": f"{__name__}.ProjectedAlignment", "init_args": term_args}}
    return tiny_module(terms=terms)


def test_label_dropout_uses_null_label_at_the_configured_rate():
    module = tiny_module(class_dropout=0.25)
    torch.manual_seed(0)
    y = torch.randint(0, 10, (20000,))
    dropped = module.drop_labels(y)
    is_null = dropped == 10
    assert abs(is_null.float().mean().item() - 0.25) < 0.01
    assert torch.equal(dropped[~is_null], y[~is_null])
    assert torch.equal(tiny_module(class_dropout=0.0).drop_labels(y), y)


def test_exit_head_runs_only_while_exit_loss_is_active():
    terms = model_config()["terms"]
    terms["ig_exit"]["init_args"]["stop_step"] = 10
    module = tiny_module(terms=terms)
    calls = []
    module.backbone.exit_head(2).register_forward_hook(lambda *a: calls.append(1))
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    _, terms = module.compute_loss(x, y, step=0)
    assert set(terms) == {"diffusion", "ig_exit"} and len(calls) == 1
    _, terms = module.compute_loss(x, y, step=10)
    assert set(terms) == {"diffusion"} and len(calls) == 1


def test_loss_terms_decrease_on_tiny_overfit_run():
    torch.manual_seed(0)
    module = tiny_module(class_dropout=0.0)
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    y = torch.arange(16) % 10
    opt = torch.optim.AdamW(module.parameters(), lr=2e-3)
    history = []
    for step in range(80):
        # the same t and noise every step: a pure regression the model must be able to fit
        loss, terms = module.compute_loss(x, y, step, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: v.item() for k, v in terms.items()})
    for term in ("diffusion", "ig_exit"):
        first = sum(h[term] for h in history[:10]) / 10
        last = sum(h[term] for h in history[-10:]) / 10
        assert last < 0.3 * first, (term, first, last)


def test_validation_loss_is_deterministic():
    module = tiny_module()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.02)
    g1, g2 = (torch.Generator().manual_seed(3) for _ in range(2))
    a, _ = module.compute_loss(x, y, 0, generator=g1)
    b, _ = module.compute_loss(x, y, 0, generator=g2)
    assert a.item() == b.item()


def test_hyperparameters_are_the_config_and_rebuild_the_same_module():
    module = tiny_module()

    def plain(v):
        return v is None or isinstance(v, (bool, int, float, str)) or \
            (isinstance(v, (list, tuple)) and all(map(plain, v))) or \
            (isinstance(v, dict) and all(map(plain, v.values())))
    hparams = dict(module.hparams)
    assert plain(hparams)
    assert hparams["backbone"]["class_path"] == "igdit.models.SiT" and hparams["backbone"]["init_args"]["size"] == "T/2"
    assert hparams["terms"]["ig_exit"]["init_args"]["weight"] == 0.5
    assert hparams["optimizer"]["class_path"] == "torch.optim.AdamW"
    rebuilt = build_module({k: v for k, v in hparams.items() if not k.startswith("_")})
    assert {k: v for k, v in rebuilt.hparams.items()} == hparams
    assert list(rebuilt.state_dict()) == list(module.state_dict())


def test_optimizer_and_scheduler_come_from_their_class_paths():
    module = tiny_module(optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5, "momentum": 0.9}},
                         lr_scheduler={"class_path": "igdit.optim.LinearWarmup", "init_args": {"warmup_steps": 4}})
    conf = module.configure_optimizers()
    optimizer, schedule = conf["optimizer"], conf["lr_scheduler"]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    assert schedule["interval"] == "step"
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule["scheduler"].step()
    assert lrs == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5, 0.5])


def test_a_terms_own_weights_are_trained_averaged_and_saved_and_a_frozen_network_is_none_of_these():
    module = _with_term(block=2)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    loss, values = module.compute_loss(x, y, step=0)
    loss.backward()
    term = module.objective["align"]
    assert term.projector.weight.grad is not None and term.projector.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in term.encoder.net.parameters())  # frozen: no gradient
    # blocks after the one the term reads get no gradient from it
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in module.backbone.blocks[2].parameters())
    optimised = {id(p) for group in module.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert id(term.projector.weight) in optimised
    assert not any(id(p) in optimised for p in term.encoder.net.parameters())
    assert "objective.align.projector.weight" in module.state_dict()
    assert not any("encoder" in key for key in module.state_dict())
    # EMAWeightAveraging deep-copies the module: the projector is copied (and averaged), the frozen net shared
    averaged = copy.deepcopy(module)
    assert averaged.objective["align"].projector is not term.projector
    assert averaged.objective["align"].encoder.net is term.encoder.net


def test_bad_model_values_stop_with_one_line():
    cases = [({"backbone": {"exits": [0]}}, "model.backbone.exits"),
             ({"backbone": {"exits": [6]}}, "model.backbone.exits"),
             ({"backbone": {"size": "Huge/2"}}, "size"),
             ({"class_dropout": 1.5}, "model.class_dropout"),
             ({"optimizer": {"class_path": "torch.optim.NoSuch"}}, "model.optimizer"),
             ({"transport": {"path": "vp"}}, "model.transport.path")]
    for changes, field in cases:
        with pytest.raises((ConfigError, ArgumentError)) as err:
            tiny_module(**changes)
        message = one_line(err.value)
        assert field in message and "\n" not in message, (changes, message)
