"""Self-Transcendence (ST paper Eqs. 1-4): the VAE-align head, the self-guided loss with its frozen teacher, the
chain of both stages, and the paper's representation claim at digits scale (slow)."""
import copy
import time
from pathlib import Path

import lightning
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from jsonargparse import ArgumentError

from igdit.cli import main
from igdit.commands.fit import load_chain
from igdit.config import ConfigError, one_line
from igdit.models.output import DiTOutput
from igdit.objectives import LossInputs, VAEAlignLoss, file_digest

from helpers import REPO, tiny_module

NULL = 10  # the digits model's null label (num_classes)


def _vae_align(**args) -> dict:
    return {"class_path": "igdit.objectives.VAEAlignLoss", "init_args": {"projector_dim": 32, **args}}


def _self_guided(teacher, **args) -> dict:
    return {"class_path": "igdit.objectives.SelfGuidedLoss",
            "init_args": {"teacher_ckpt": None if teacher is None else str(teacher), "student_block": 3,
                          "teacher_block": 4, "projector_dim": 32, **args}}


def _stage1_checkpoint(path: Path, backbone: dict | None = None, seed: int = 0) -> Path:
    """An igdit checkpoint of a stage-1 model (diffusion + IG exit + VAE-align), written as Lightning writes one
    with EMAWeightAveraging: EMA weights in ``state_dict``, the optimiser's in ``current_model_state`` (here
    they differ, so a test can tell which one was loaded)."""
    torch.manual_seed(seed)
    terms = {"diffusion": {"class_path": "igdit.objectives.DiffusionLoss"},
             "ig_exit": {"class_path": "igdit.objectives.ExitLoss"}, "vae_align": _vae_align(block=1)}
    module = tiny_module(terms=terms, backbone=backbone or {})
    for p in module.parameters():  # give the zero-initialised heads and adaLN layers something to say
        p.data.add_(0.05 * torch.randn_like(p))
    raw = {k: v.clone() for k, v in module.state_dict().items()}
    ema = {k: v + 0.01 if v.is_floating_point() else v.clone() for k, v in raw.items()}
    torch.save({"state_dict": ema, "current_model_state": raw, "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__, "epoch": 0, "global_step": 100}, path)
    return path


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    return _stage1_checkpoint(tmp_path_factory.mktemp("teacher") / "stage1.ckpt")


def _student(teacher, student_terms=None, **args):
    terms = {"diffusion": {"class_path": "igdit.objectives.DiffusionLoss"},
             "ig_exit": {"class_path": "igdit.objectives.ExitLoss"}} if student_terms is None else student_terms
    module = tiny_module(terms={**terms, "self_guided": _self_guided(teacher, **args)})
    module.setup("fit")
    return module


# ---- stage 1: VAE-based alignment (Eq. 1) ------------------------------------------------------------------
def _head_by_hand(term: VAEAlignLoss, hidden: torch.Tensor) -> torch.Tensor:
    """MLP -> affine-free LayerNorm -> Linear -> unpatchify, written out for SiT-T/2 on 1x8x8 (4x4 tokens, p 2)."""
    l1, l2, l3 = (m for m in term.projector if isinstance(m, nn.Linear))
    h = F.silu(hidden @ l1.weight.T + l1.bias)
    h = F.silu(h @ l2.weight.T + l2.bias)
    h = h @ l3.weight.T + l3.bias
    h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-6)
    patches = h @ term.linear.weight.T + term.linear.bias  # (N, 16, p*p*C = 4), each ordered (p, q, c)
    image = torch.zeros(hidden.shape[0], 1, 8, 8)
    for token in range(16):
        row, col = divmod(token, 4)
        for p in range(2):
            for q in range(2):
                image[:, 0, 2 * row + p, 2 * col + q] = patches[:, token, 2 * p + q]
    return image


def test_vae_align_head_is_an_mlp_an_affine_free_layernorm_and_a_linear_layer_unpatchified():
    module = tiny_module(terms={"vae_align": _vae_align(block=2, projector_dim=48)})
    term = module.objective["vae_align"]
    widths = [(m.in_features, m.out_features) for m in term.projector if isinstance(m, nn.Linear)]
    assert widths == [(128, 48), (48, 48), (48, 128)]
    assert sum(isinstance(m, nn.SiLU) for m in term.projector) == 2
    assert term.norm.elementwise_affine is False and term.norm.eps == 1e-6
    assert (term.linear.in_features, term.linear.out_features) == (128, 4)
    # xavier, not zero init: the head predicts something from the first step
    for layer in [*(m for m in term.projector if isinstance(m, nn.Linear)), term.linear]:
        assert layer.weight.abs().sum() > 0 and layer.bias.abs().sum() == 0
    hidden = torch.randn(3, 16, 128)
    torch.testing.assert_close(term.predict(hidden, module.backbone), _head_by_hand(term, hidden))


@pytest.mark.parametrize("target", ["v", "x0"])
def test_vae_align_regresses_the_velocity_or_the_clean_latent_inside_its_t_range(target):
    module = tiny_module(terms={"vae_align": _vae_align(block=2, target=target)})
    term = module.objective["vae_align"]
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    hidden = torch.randn(4, 16, 128, generator=g)
    t = torch.tensor([0.1, 0.4, 0.55, 0.9])  # default t_range [0.4, 0.7] keeps the middle two
    inputs = LossInputs(x=x, noise=torch.zeros_like(x), t=t, x_t=torch.zeros_like(x), target=v,
                        y=torch.zeros(4, dtype=torch.long), y_clean=torch.zeros(4, dtype=torch.long),
                        output=DiTOutput(final=None, hidden={2: hidden}), step=0, backbone=module.backbone)
    prediction = _head_by_hand(term, hidden)
    wanted, other = (v, x) if target == "v" else (x, v)
    per = ((prediction - wanted) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(term(inputs), (per[1] + per[2]) / 4)
    assert not torch.allclose(term(inputs), (((prediction - other) ** 2).flatten(1).mean(1)[1:3]).sum() / 4)
    assert term.hidden_needed(0) == (2,) and term.weight == 0.5 and term.t_range == (0.4, 0.7)


def test_vae_align_trains_blocks_up_to_its_block_and_its_head_and_nothing_after():
    module = tiny_module(terms={"vae_align": _vae_align(block=2, t_range=[0.0, 1.0])})
    loss, _ = module.compute_loss(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)), step=0)
    loss.backward()
    grad = lambda mod: sum(p.grad.abs().sum() for p in mod.parameters() if p.grad is not None)  # noqa: E731
    term, backbone = module.objective["vae_align"], module.backbone
    assert grad(term.projector) > 0 and grad(term.linear) > 0
    assert grad(backbone.blocks[0]) > 0 and grad(backbone.blocks[1]) > 0
    for later in [*backbone.blocks[2:], backbone.final_layer, backbone.exit_head(2)]:
        assert grad(later) == 0


def test_vae_align_block_outside_the_backbone_is_one_line():
    with pytest.raises(ConfigError, match=r"^model.terms.vae_align.block: 7 is not allowed; blocks are 1-based "
                                          r"indices in \[1, 6\]"):
        tiny_module(terms={"vae_align": _vae_align(block=7)})
    with pytest.raises((ConfigError, ArgumentError)) as err:
        tiny_module(terms={"vae_align": _vae_align(block=0)})
    assert "block" in one_line(err.value) and "\n" not in one_line(err.value)


# ---- stage 2: the self-guided loss (Eqs. 2-4) ----------------------------------------------------------------
def _teacher_features(teacher, x_t, t, y, block):
    with torch.no_grad():
        return teacher(x_t, t, y, hidden=(block,)).hidden[block]


def test_guided_target_is_f_u_plus_omega_times_f_c_minus_f_u_from_the_stage1_raw_weights(teacher_ckpt):
    term = _student(teacher_ckpt).objective["self_guided"]
    teacher = term.teacher.net
    g = torch.Generator().manual_seed(1)
    x_t, t, y = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([0.45, 0.5, 0.6]), torch.tensor([1, 5, 9])
    f_c = _teacher_features(teacher, x_t, t, y, 4)
    f_u = _teacher_features(teacher, x_t, t, torch.full_like(y, NULL), 4)
    assert not torch.allclose(f_c, f_u)
    for omega, expected in [(0.0, f_u), (1.0, f_c), (30.0, f_u + 30.0 * (f_c - f_u))]:
        term.omega = omega  # one batched pass against two separate ones: equal up to float32 summation order
        torch.testing.assert_close(term.guided_features(x_t, t, y), expected, rtol=1e-4, atol=1e-4 * (1 + omega))
    # the raw (optimiser) weights of the checkpoint, as the public code loads ckpt['model']
    raw = torch.load(teacher_ckpt, weights_only=True)["current_model_state"]
    torch.testing.assert_close(teacher.blocks[0].attn.qkv.weight, raw["backbone.blocks.0.attn.qkv.weight"])


def test_self_guided_loss_is_the_mse_between_the_projected_student_block_and_f_g_inside_its_t_range(teacher_ckpt):
    module = _student(teacher_ckpt, omega=2.0)
    term = module.objective["self_guided"]
    g = torch.Generator().manual_seed(2)
    x_t, hidden = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 16, 128, generator=g)
    t, y = torch.tensor([0.2, 0.4, 0.65, 0.95]), torch.tensor([3, 3, 7, 7])
    inputs = LossInputs(x=torch.zeros_like(x_t), noise=torch.zeros_like(x_t), t=t, x_t=x_t, target=torch.zeros_like(x_t),
                        y=y, y_clean=y, output=DiTOutput(final=None, hidden={3: hidden}), step=0,
                        backbone=module.backbone)
    teacher = term.teacher.net
    f_c = _teacher_features(teacher, x_t, t, y, 4)
    f_u = _teacher_features(teacher, x_t, t, torch.full_like(y, NULL), 4)
    per = ((term.projector(hidden) - (f_u + 2.0 * (f_c - f_u))) ** 2).mean((1, 2))
    torch.testing.assert_close(term(inputs), (per[1] + per[2]) / 4)  # t 0.2 and 0.95 lie outside [0.4, 0.7]
    assert term.logged["f_g_norm"] > 0


class Calls:
    """Records the calls of a module (arguments included) and of the blocks and heads inside a backbone."""

    def __init__(self, backbone):
        self.forwards, self.blocks, self.heads = [], [], 0
        backbone.register_forward_pre_hook(lambda m, args, kwargs: self.forwards.append((args, kwargs)),
                                           with_kwargs=True)
        for i, block in enumerate(backbone.blocks, start=1):
            block.register_forward_hook(lambda *_, i=i: self.blocks.append(i))
        for head in [backbone.final_layer, *(backbone.exit_head(i) for i in backbone.exit_indices)]:
            head.register_forward_hook(lambda *_: setattr(self, "heads", self.heads + 1))


def test_teacher_runs_once_on_the_students_x_t_with_the_undropped_and_the_null_label_and_stops_at_block_m(
        teacher_ckpt):
    module = _student(teacher_ckpt, t_range=[0.0, 1.0])
    teacher, student = Calls(module.objective["self_guided"].teacher.net), Calls(module.backbone)
    y_clean = torch.tensor([2, 4, 6, 8])
    dropped = torch.tensor([2, NULL, NULL, 8])  # the student's labels after class dropout
    module.compute_loss(torch.randn(4, 1, 8, 8), dropped, step=0, y_clean=y_clean)
    assert len(teacher.forwards) == 1  # one batched pass for both branches
    (x, t, y), options = teacher.forwards[0]
    (x_student, t_student, y_student), _ = student.forwards[0]
    torch.testing.assert_close(y, torch.cat([y_clean, torch.full_like(y_clean, NULL)]))
    assert torch.equal(y_student, dropped)
    torch.testing.assert_close(x, torch.cat([x_student, x_student]))
    torch.testing.assert_close(t, torch.cat([t_student, t_student]))
    assert options["stop_after"] == 4 and teacher.blocks == [1, 2, 3, 4] and teacher.heads == 0
    assert module.objective["self_guided"].teacher.net.training is False


def test_the_teacher_sees_only_samples_inside_the_t_range(teacher_ckpt):
    module = _student(teacher_ckpt)  # [0.4, 0.7]
    calls = Calls(module.objective["self_guided"].teacher.net)
    torch.manual_seed(0)
    module.compute_loss(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)), step=0)
    (_, t, _), _ = calls.forwards[0]
    assert 0 < len(t) < 2 * 64 and ((t >= 0.4) & (t <= 0.7)).all()


def test_after_the_stop_step_no_teacher_pass_runs_and_no_hidden_state_is_asked_for(teacher_ckpt):
    module = _student(teacher_ckpt, stop_step=5, t_range=[0.0, 1.0])
    term = module.objective["self_guided"]
    calls = Calls(term.teacher.net)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    assert module.objective.hidden_needed(4) == (3,)
    _, values = module.compute_loss(x, y, step=4)
    assert len(calls.forwards) == 1 and "self_guided" in values
    assert term.hidden_needed(5) == () and module.objective.hidden_needed(5) == ()
    _, values = module.compute_loss(x, y, step=5)
    assert len(calls.forwards) == 1 and "self_guided" not in values


def test_only_the_student_blocks_up_to_n_and_the_projector_learn_from_the_guide(teacher_ckpt):
    module = _student(teacher_ckpt, student_terms={}, t_range=[0.0, 1.0])
    loss, _ = module.compute_loss(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)), step=0)
    loss.backward()
    grad = lambda mod: sum(p.grad.abs().sum() for p in mod.parameters() if p.grad is not None)  # noqa: E731
    term, backbone = module.objective["self_guided"], module.backbone
    assert grad(term.projector) > 0 and grad(backbone.blocks[2]) > 0
    for later in [*backbone.blocks[3:], backbone.final_layer, backbone.exit_head(2)]:
        assert grad(later) == 0
    assert all(p.grad is None and not p.requires_grad for p in term.teacher.net.parameters())


def test_the_teacher_is_frozen_not_trained_averaged_or_saved_and_recorded_by_path_and_hash(teacher_ckpt):
    module = _student(teacher_ckpt)
    term = module.objective["self_guided"]
    module.train()
    assert term.teacher.net.training is False
    assert all(k.startswith("objective.self_guided.projector.") for k in module.state_dict()
               if k.startswith("objective.self_guided"))
    optimised = {id(p) for group in module.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert id(term.projector[0].weight) in optimised
    assert not any(id(p) in optimised for p in term.teacher.net.parameters())
    assert copy.deepcopy(module).objective["self_guided"].teacher.net is term.teacher.net
    recorded = module.hparams["frozen_networks"]["self_guided.teacher"]
    assert recorded == {"source": str(teacher_ckpt.resolve()), "sha256": file_digest(teacher_ckpt), "weights": "raw"}


def test_teacher_weights_ema_reads_the_checkpoints_averaged_weights(teacher_ckpt):
    teacher = _student(teacher_ckpt, teacher_weights="ema").objective["self_guided"].teacher.net
    ema = torch.load(teacher_ckpt, weights_only=True)["state_dict"]
    torch.testing.assert_close(teacher.blocks[0].attn.qkv.weight, ema["backbone.blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("backbone,args,field,says", [
    ({"hidden_size": 64, "num_heads": 4}, {}, "teacher_ckpt", "its hidden width is 64, the student's 128"),
    ({"size": "T/4", "exits": [2]}, {}, "teacher_ckpt", "its patch size (token grid) is 4, the student's 2"),
    ({"input_size": 16}, {}, "teacher_ckpt", "its latent size is 16, the student's 8"),
    ({"num_classes": 5}, {}, "teacher_ckpt", "its number of classes (its null label) is 5, the student's 10"),
    ({"depth": 3}, {}, "teacher_block", "has blocks 1..3"),
    ({}, {"teacher_block": 7}, "teacher_block", "has blocks 1..6"),
])
def test_a_teacher_that_does_not_fit_the_student_is_one_line_naming_the_first_mismatch(
        backbone, args, field, says, tmp_path):
    bad = _stage1_checkpoint(tmp_path / "other.ckpt", backbone=backbone)
    with pytest.raises(ConfigError) as err:
        _student(bad, **args)
    message = one_line(err.value)
    assert message.startswith(f"model.terms.self_guided.{field}: ") and says in message and "\n" not in message


def test_missing_teacher_and_bad_student_block_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^model.terms.self_guided.teacher_ckpt: '.*nothing.ckpt' is not "
                                          r"allowed; is not a file"):
        _student(tmp_path / "nothing.ckpt")
    with pytest.raises(ConfigError, match=r"^model.terms.self_guided.teacher_ckpt: None is not allowed; stage 2 "
                                          r"needs the frozen stage-1 model.*st_digits.yaml"):
        _student(None)
    with pytest.raises(ConfigError, match=r"^model.terms.self_guided.student_block: 9 is not allowed; blocks are "
                                          r"1-based indices in \[1, 6\]"):
        _student(tmp_path / "nothing.ckpt", student_block=9)


def _fit_args(config, root: Path, scratch: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(config), "--data.root", str(root),
            "--trainer.logger.init_args.tracking_uri", f"sqlite:///{scratch / 'mlflow.db'}",
            "--trainer.logger.init_args.artifact_location", (scratch / "mlartifacts").as_uri(),
            "--trainer.default_root_dir", str(scratch / "runs"), "--trainer.enable_progress_bar", "false", *extra]


def test_a_stage2_run_without_a_teacher_stops_with_one_line_before_training(digits_root, tmp_path, capsys):
    assert main(_fit_args(REPO / "experiments/st_stage2_digits.yaml", digits_root, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: model.terms.self_guided.teacher_ckpt: None is not allowed; stage 2 needs")
    assert not list((tmp_path / "runs").rglob("*.ckpt"))  # not a step was trained


@pytest.mark.parametrize("size,student,teacher,align_block,stop", [("b2", 6, 8, 2, 100_000), ("xl2", 14, 19, 5, 50_000)])
def test_paper_configs_carry_table_1s_settings(size, student, teacher, align_block, stop):
    from igdit.module import build_module

    stage1, stage2 = (yaml.safe_load((REPO / f"experiments/sit_{size}_st_stage{i}.yaml").read_text()) for i in (1, 2))
    for cfg in (stage1, stage2):
        backbone = cfg["model"]["backbone"]["init_args"]
        assert backbone["qk_norm"] is True and backbone["exits"] == []  # the ST code's SiT, no IG head
        assert cfg["model"]["optimizer"]["init_args"]["lr"] == 1e-4 and cfg["data"]["batch_size"] == 256
        assert cfg["trainer"]["gradient_clip_val"] == 1.0
        ema = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("EMAWeightAveraging"))
        assert ema["init_args"]["decay"] == 0.9999
        with torch.device("meta"):
            build_module(cfg["model"])  # every block exists in the model
    align = stage1["model"]["terms"]["vae_align"]["init_args"]
    # the t-range as the public code computes it (what the published numbers come from), the teacher in float32
    assert align == {"block": align_block, "target": "v", "projector_dim": 2048, "weight": 0.5, "t_range": [0.4, 0.7],
                     "t_range_mode": "official_broadcast"}
    assert stage1["trainer"]["max_steps"] == 200_000  # 40 epochs at batch 256
    guide = stage2["model"]["terms"]["self_guided"]["init_args"]
    assert guide == {"teacher_ckpt": None, "teacher_weights": "raw", "student_block": student, "teacher_block": teacher,
                     "omega": 30.0, "projector_dim": 2048, "weight": 0.5, "t_range": [0.4, 0.7],
                     "t_range_mode": "official_broadcast", "teacher_precision": "float32", "stop_step": stop}
    assert stage2["trainer"]["max_steps"] == 400_000  # 80 epochs


# ---- the chain of both stages --------------------------------------------------------------------------------
def _chain(tmp_path, stages) -> Path:
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))
    return path


def test_the_shipped_chain_passes_stage1s_last_checkpoint_to_the_stage2_teacher(digits_root):
    common = ["--data.root", str(digits_root)]
    stages = load_chain(str(REPO / "experiments/st_digits.yaml"), common)
    assert [s.path.name for s in stages] == ["st_stage1_digits.yaml", "st_stage2_digits.yaml"]
    assert stages[0].args == common
    assert stages[1].args == [*common, "--model.terms.self_guided.teacher_ckpt", "<last checkpoint of stage 1>"]


@pytest.mark.parametrize("stages,says", [
    ([], "stages: [] is not allowed; expected a list of experiments"),
    ([{"config": "nothing.yaml"}], "stages[0].config: 'nothing.yaml' is not allowed; no such experiment YAML"),
    ([{"config": "st_stage1_digits.yaml", "previous_checkpoint": "model.terms.self_guided.teacher_ckpt"}],
     "stages[0].previous_checkpoint"),
    ([{"config": "st_stage1_digits.yaml"},
      {"config": "st_stage2_digits.yaml", "previous_checkpoint": "model.terms.no_such.teacher_ckpt"}],
     "stages[1]: 'st_stage2_digits.yaml' is not allowed;"),
    ([{"config": "st_stage1_digits.yaml", "overrides": ["--model.terms.vae_align.block", "9"]}],
     "stages[0]: 'st_stage1_digits.yaml' is not allowed; model.terms.vae_align.block: 9"),
    ([{"config": "st_stage1_digits.yaml", "note": "x"}], "note"),
])
def test_a_bad_chain_is_one_line_before_any_stage_trains(stages, says, digits_root, tmp_path, capsys):
    chain = REPO / "experiments" / "_test_chain.yaml"  # stage paths are relative to the chain file
    try:
        chain.write_text(yaml.safe_dump({"stages": stages}))
        assert main(["fit", "--config", str(chain), "--data.root", str(digits_root),
                     "--trainer.default_root_dir", str(tmp_path / "runs")]) == 2
    finally:
        chain.unlink()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and says in err, err
    assert not (tmp_path / "runs").exists()


def test_a_stage_that_keeps_no_last_checkpoint_cannot_feed_the_next(digits_root, tmp_path, capsys):
    stage1 = yaml.safe_load((REPO / "experiments/st_stage1_digits.yaml").read_text())
    for callback in stage1["trainer"]["callbacks"]:
        callback.get("init_args", {}).pop("save_last", None)
    (tmp_path / "stage1.yaml").write_text(yaml.safe_dump(stage1))
    (tmp_path / "stage2.yaml").write_text((REPO / "experiments/st_stage2_digits.yaml").read_text())
    chain = _chain(tmp_path, [{"config": "stage1.yaml"}, {"config": "stage2.yaml",
                                                          "previous_checkpoint": "model.terms.self_guided.teacher_ckpt"}])
    assert main(["fit", "--config", str(chain), "--data.root", str(digits_root)]) == 2
    assert "stages[0].config: 'stage1.yaml' is not allowed; keeps no last checkpoint for stage 2" in capsys.readouterr().err


def test_validate_refuses_a_chain(capsys):
    assert main(["validate", "--config", str(REPO / "experiments/st_digits.yaml")]) == 2
    assert "only `igdit fit` runs" in capsys.readouterr().err


# ---- the representation claim at digits scale (slow) ---------------------------------------------------------
def _short(source: str, path: Path, max_steps: int, every: int, **terms) -> Path:
    """A shipped digits experiment shortened for the test: max_steps, FID (200 samples, 5 Heun steps) and
    checkpoints every ``every`` steps, a small grid; ``terms`` updates a term's init_args."""
    cfg = yaml.safe_load((REPO / "experiments" / source).read_text())
    cfg["trainer"].update(max_steps=max_steps, val_check_interval=every, enable_progress_bar=False)
    for cb in cfg["trainer"]["callbacks"]:
        args = cb.setdefault("init_args", {})
        if cb["class_path"].endswith(("ModelCheckpoint", "callbacks.Checkpoint")) and "every_n_train_steps" in args:
            args["every_n_train_steps"] = every
        if cb["class_path"].endswith("FIDCallback"):
            args.update(every_n_steps=every, num_samples=200)
        if cb["class_path"].endswith("SampleGrid"):
            args.update(samples_per_class=1, steps=4)
    for name, changes in terms.items():
        cfg["model"]["terms"][name]["init_args"].update(changes)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _block_features(ckpt: Path, root: Path, block: int, t: float = 0.5, weights: str = "ema"):
    """Mean-pooled tokens (N, D) after ``block`` of a checkpoint's EMA weights, for every train and val digit,
    at the same x_t (fixed noise, time t) for every model, with the null label: the probe must read the class
    from the image, not from the label embedding."""
    from igdit.checkpoints import load_module
    from igdit.data import LatentDataModule

    module = load_module(ckpt, weights=weights)
    data = LatentDataModule(root=str(root))
    out = {}
    for split in ("train", "val"):
        features, labels = [], []
        generator = torch.Generator().manual_seed(0)
        for x, y in data.latent_batches(split, 256):
            noise = torch.randn(x.shape, generator=generator)
            x_t, _ = module.transport.interpolate(x, noise, torch.full((len(x),), t))
            with torch.no_grad():
                hidden = module.backbone(x_t, torch.full((len(x),), t), torch.full_like(y, NULL), hidden=(block,),
                                         stop_after=block).hidden[block]
            features.append(hidden.mean(1))
            labels.append(y)
        out[split] = (torch.cat(features).numpy(), torch.cat(labels).numpy())
    return out


def _term_losses(ckpt: Path, root: Path, term: str) -> tuple[float, float]:
    """The term's loss for a freshly initialised model and for the checkpoint's raw weights, both on the same
    256 held-out digits with the same noise, times and labels (step 0, where every term is on)."""
    from igdit.checkpoints import load_module, model_config, read_checkpoint
    from igdit.data import LatentDataModule
    from igdit.module import build_module

    x, y = next(iter(LatentDataModule(root=str(root)).latent_batches("val", 256)))
    torch.manual_seed(0)
    fresh = build_module(model_config(read_checkpoint(ckpt, "ckpt")["hyper_parameters"])).eval()
    losses = []
    for module in (fresh, load_module(ckpt, weights="raw")):
        with torch.no_grad():
            _, terms = module.compute_loss(x, y, 0, torch.Generator().manual_seed(0))
        losses.append(float(terms[term]))
    return losses[0], losses[1]


def _probe_accuracy(features) -> float:
    """A linear probe: logistic regression on standardised features of the train digits, accuracy on val."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (x_train, y_train), (x_val, y_val) = features["train"], features["val"]
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(probe.fit(x_train, y_train).score(x_val, y_val))




@pytest.mark.slow
@pytest.mark.timeout(1200)  # three short trainings; 3-4 min alone on 2 cores, longer on a busy machine
def test_st_end_to_end_on_digits_trains_both_stages_and_reports_the_probe_against_a_plain_model(
        digits_root, tmp_path, capsys):
    """Stage 1 (100 steps) -> stage 2 (200 steps, the guide on for the first 50) through the chain and the real
    CLI, against the default experiment for the same 200 steps; then the same linear probe on both models'
    block-3 features (mean-pooled tokens at t = 0.5 with the null label, EMA weights) of the held-out digits.

    The paper's claim, that the student's probe beats the plain model's, does NOT hold reliably at this scale
    (see the numbers this test prints, and the report of issue 11), so it is reported, not asserted; what is
    asserted is what ST must do at any scale: the chain hands stage 1's checkpoint to stage 2, the student's run
    records it, both alignment losses fall while they are on, the guide is off after its stop step, and every
    model's features carry the class."""
    import math

    from mlflow.tracking import MlflowClient

    stage1 = _short("st_stage1_digits.yaml", tmp_path / "s1.yaml", 100, 100)
    stage2 = _short("st_stage2_digits.yaml", tmp_path / "s2.yaml", 200, 200, self_guided={"stop_step": 50})
    plain = _short("default.yaml", tmp_path / "plain.yaml", 200, 200)
    chain = _chain(tmp_path, [{"config": stage1.name},
                              {"config": stage2.name, "previous_checkpoint": "model.terms.self_guided.teacher_ckpt"}])
    start = time.perf_counter()
    assert main(_fit_args(chain, digits_root, tmp_path)) == 0
    seconds = {"chain": time.perf_counter() - start}
    printed = capsys.readouterr().out
    start = time.perf_counter()
    assert main(_fit_args(plain, digits_root, tmp_path)) == 0
    seconds["plain"] = time.perf_counter() - start

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("igdit-digits")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    # the YAMLs' run names are prefixes, made unique per run (date and a random suffix)
    assert [run.info.run_name.rsplit("-", 3)[0] for run in runs[:2]] == ["st-stage1", "st-stage2"] and len(runs) == 3
    checkpoint = {name: tmp_path / "runs" / "igdit-digits" / run.info.run_id / "checkpoints" / "last.ckpt"
                  for name, run in zip(("stage1", "student", "plain"), runs)}
    # the chain handed stage 1's last checkpoint to stage 2, and the student's run says which file it read
    assert f"stage 1 checkpoint  {checkpoint['stage1']}  (passed to stage 2 as " in printed
    assert runs[1].data.params["frozen_networks/self_guided.teacher/source"] == str(checkpoint["stage1"])
    assert runs[1].data.params["frozen_networks/self_guided.teacher/sha256"] == file_digest(checkpoint["stage1"])

    def history(run, key):
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))

    # both alignments learned: on the same batch, noise and times, lower than for an untrained model
    align = _term_losses(checkpoint["stage1"], digits_root, "vae_align")
    guide = _term_losses(checkpoint["student"], digits_root, "self_guided")
    assert align[1] < 0.9 * align[0] and guide[1] < 0.9 * guide[0], (align, guide)
    guided_steps = [step for step, _ in history(runs[1], "train/self_guided")]
    assert guided_steps and max(guided_steps) < 50
    assert max(step for step, _ in history(runs[1], "train/diffusion")) > 150
    assert all(math.isfinite(run.data.metrics["train/loss"]) for run in runs)

    probe = {name: _probe_accuracy(_block_features(path, digits_root, 3)) for name, path in checkpoint.items()}
    fd = {name: run.data.metrics["fd_digits/none"] for name, run in zip(checkpoint, runs)}
    assert all(accuracy > 0.2 for accuracy in probe.values())  # ten classes: chance is 0.1
    with capsys.disabled():
        print("\nST on digits (stage 1 100 steps, stage 2 / plain 200 steps): block-3 linear probe "
              + ", ".join(f"{k} {v:.3f}" for k, v in probe.items()) + "; fd_digits/none "
              + ", ".join(f"{k} {v:.1f}" for k, v in fd.items())
              + f"; alignment loss untrained -> trained: vae_align {align[0]:.3f} -> {align[1]:.3f}, self_guided "
              f"{guide[0]:.1f} -> {guide[1]:.1f}; seconds chain {seconds['chain']:.0f}, plain {seconds['plain']:.0f}")
