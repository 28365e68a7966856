"""IGDiTModule: the training step, label dropout, loss terms on a tiny overfit run, checkpoint contents."""
import pytest
import torch

from igdit.config import ConfigError
from igdit.module import IGDiTModule

TINY = dict(name="SiT-T/2", exits=[2], input_size=8, in_channels=1, num_classes=10)


def test_label_dropout_uses_null_label_at_the_configured_rate():
    module = IGDiTModule(**TINY, class_dropout=0.25)
    torch.manual_seed(0)
    y = torch.randint(0, 10, (20000,))
    dropped = module.drop_labels(y)
    is_null = dropped == 10
    assert abs(is_null.float().mean().item() - 0.25) < 0.01
    assert torch.equal(dropped[~is_null], y[~is_null])
    assert torch.equal(IGDiTModule(**TINY, class_dropout=0.0).drop_labels(y), y)


def test_exit_head_runs_only_while_exit_loss_is_active():
    module = IGDiTModule(**TINY, exit_loss={"weight": 0.5, "stop_step": 10})
    calls = []
    module.backbone.exit_head(2).register_forward_hook(lambda *a: calls.append(1))
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    _, terms = module.compute_loss(x, y, step=0)
    assert set(terms) == {"diffusion", "ig_exit"} and len(calls) == 1
    _, terms = module.compute_loss(x, y, step=10)
    assert set(terms) == {"diffusion"} and len(calls) == 1


def test_loss_terms_decrease_on_tiny_overfit_run():
    torch.manual_seed(0)
    module = IGDiTModule(**TINY, class_dropout=0.0)
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
    module = IGDiTModule(**TINY)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.02)
    g1, g2 = (torch.Generator().manual_seed(3) for _ in range(2))
    a, _ = module.compute_loss(x, y, 0, generator=g1)
    b, _ = module.compute_loss(x, y, 0, generator=g2)
    assert a.item() == b.item()


def test_hyperparameters_are_plain_containers():
    module = IGDiTModule(**TINY)
    def plain(v):
        return v is None or isinstance(v, (bool, int, float, str)) or \
            (isinstance(v, (list, tuple)) and all(map(plain, v))) or \
            (isinstance(v, dict) and all(map(plain, v.values())))
    assert plain(dict(module.hparams))
    rebuilt = IGDiTModule(**dict(module.hparams))  # what load_from_checkpoint does
    assert rebuilt.hparams == module.hparams


@pytest.mark.parametrize("kwargs,field", [
    ({"exits": [0]}, "model.exits"),
    ({"exits": [6]}, "model.exits"),
    ({"exit_loss": {"weight": -0.1}}, "model.exit_loss.weight"),
    ({"name": "SiT-Huge/2"}, "model.name"),
    ({"class_dropout": 1.5}, "model.class_dropout"),
    ({"optimizer": {"lr": 0.0}}, "model.optimizer.lr"),
    ({"transport": {"path": "vp"}}, "model.transport.path"),
])
def test_bad_model_values_stop_with_one_line(kwargs, field):
    with pytest.raises(ConfigError) as err:
        IGDiTModule(**{**TINY, **kwargs})
    assert str(err.value).startswith(field + ":") and "\n" not in str(err.value)
