"""The baselines both papers compare with, as loss terms: REPA, SRA, LayerSync, the dispersive loss.

Each formula on tiny hand-computed tensors; where the gradient goes with only the term active; the frozen
networks (REPA's encoder, SRA's EMA teacher) and their one-line errors; a short fit through the real CLI.
"""
import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from helpers import REPO, model_config
from igdit.cli import main
from igdit.config import ConfigError, one_line
from igdit.data import LatentDataModule
from igdit.models import SiT
from igdit.models.output import DiTOutput
from igdit.module import build_module
from igdit.objectives import (DigitsPatchEncoder, DINOv2Encoder, DispersiveLoss, Frozen, LayerSyncLoss, LossInputs,
                              Objective, PatchEncoder, REPALoss, SRALoss, dispersive_loss, file_digest)
from igdit.objectives.repa import negative_token_cosine
from igdit.objectives.sra import sra_distance, teacher_times
from igdit.transport import Transport


# ---- helpers -------------------------------------------------------------------------------------------------
class RandomConvEncoder(PatchEncoder):
    """A frozen random conv encoder for unit tests: (N, 1, 8, 8) -> (N, grid^2, features)."""

    def __init__(self, grid_size: int = 4, num_features: int = 6):
        super().__init__()
        self.grid_size, self.num_features = grid_size, num_features

    def load(self, field, datamodule=None):
        torch.manual_seed(5)
        stride = 8 // self.grid_size
        net = nn.Conv2d(1, self.num_features, stride, stride=stride)
        self.frozen = Frozen(net, "random conv", "none")
        return self.frozen

    def encode(self, net, images):
        return net(images.float()).flatten(2).transpose(1, 2)


def tiny_backbone(depth: int = 6) -> SiT:
    torch.manual_seed(0)
    return SiT("T/2", input_size=8, in_channels=1, num_classes=10, depth=depth, hidden_size=32, num_heads=4)


def attached(term, backbone=None):
    objective = Objective({"term": term})
    objective.attach(backbone or tiny_backbone(), Transport())
    return objective


def batch_inputs(objective, backbone, n=6, ema_backbone=None, step=0, seed=0):
    """One training batch through ``backbone`` asking for what the objective needs (identity-encoded images)."""
    g = torch.Generator().manual_seed(seed)
    x, noise = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randn(n, 1, 8, 8, generator=g)
    t = torch.rand(n, generator=g)
    transport = Transport()
    x_t, target = transport.interpolate(x, noise, t)
    y = torch.randint(0, 10, (n,), generator=g)
    out = backbone(x_t, t, y, hidden=objective.hidden_needed(step))
    return LossInputs(x=x, noise=noise, t=t, x_t=x_t, target=target, y=y, y_clean=y, output=out, step=step,
                      backbone=backbone, transport=transport, ema_backbone=ema_backbone)


def grads_by_block(backbone):
    """{1-based block: True if any parameter of it received a nonzero gradient}."""
    return {i + 1: any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
            for i, block in enumerate(backbone.blocks)}


def hidden_output(**hidden):
    return DiTOutput(final=None, hidden={int(k[1:]): v for k, v in hidden.items()})


def _inputs_with(output, t=None, n=2):
    z = torch.zeros(n, 1, 2, 2)
    t = torch.full((n,), 0.5) if t is None else t
    y = torch.zeros(n, dtype=torch.long)
    return LossInputs(x=z, noise=z, t=t, x_t=z, target=z, y=y, y_clean=y, output=output, step=0)


# ---- REPA ----------------------------------------------------------------------------------------------------
def test_repa_cosine_is_per_token_and_normalised_per_token():
    # two tokens of two features: token 1 parallel (cos 1), token 2 orthogonal (cos 0) -> -0.5
    pred = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])
    target = torch.tensor([[[6.0, 8.0], [0.0, 5.0]]])
    torch.testing.assert_close(negative_token_cosine(pred, target), torch.tensor([-0.5]))
    # scaling single tokens changes nothing (normalised per token, not over the whole map)
    torch.testing.assert_close(negative_token_cosine(pred * torch.tensor([[[10.0], [0.1]]]), target),
                               torch.tensor([-0.5]))
    # a cosine over the flattened map would give -(18 + 32) / (5.10 * 10.0 * ...) != -0.5
    flat = -F.cosine_similarity(pred.flatten(1), target.flatten(1))
    assert not torch.allclose(flat, torch.tensor([-0.5]))


def test_repa_term_aligns_the_projected_block_with_the_encoder_features_of_the_clean_images():
    backbone = tiny_backbone()
    term = REPALoss(RandomConvEncoder(), block=2, projector_dim=16)
    objective = attached(term, backbone)
    term.setup(torch.device("cpu"))
    inputs = batch_inputs(objective, backbone)
    assert objective.hidden_needed(0) == (2,)
    net = term.encoder.frozen.net
    expected = negative_token_cosine(term.projector(inputs.output.hidden[2]),
                                     net(inputs.x).flatten(2).transpose(1, 2))  # identity data: images are x
    torch.testing.assert_close(term.per_sample(inputs), expected)
    assert [m.out_features for m in term.projector if isinstance(m, nn.Linear)] == [16, 16, 6]
    assert sum(isinstance(m, nn.SiLU) for m in term.projector) == 2


def test_repa_interpolates_a_coarser_encoder_grid_bilinearly_when_asked():
    term = REPALoss(RandomConvEncoder(grid_size=2), block=2, projector_dim=8, interpolate=True)
    attached(term)
    term.setup(torch.device("cpu"))
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    coarse = term.encoder.features(images)  # (3, 4, 6) on a 2x2 grid
    grid = coarse.transpose(1, 2).reshape(3, 6, 2, 2)
    expected = F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(term.target_features(images), expected)


def test_repa_encoder_grid_mismatch_is_a_one_line_error_before_compute():
    config = model_config(terms={"repa": {"class_path": "igdit.objectives.REPALoss", "init_args": {
        "block": 2, "encoder": {"class_path": "igdit.objectives.DigitsPatchEncoder",
                                "init_args": {"image_size": 16}}}}})  # an 8x8 token grid against SiT-T/2's 4x4
    with pytest.raises(ConfigError) as err:
        build_module(config)
    message = one_line(err.value)
    assert "\n" not in message and message.startswith("model.terms.repa.encoder")
    assert "8x8 token grid" in message and "4x4" in message and "interpolate" in message


def test_repa_frozen_encoder_is_neither_trained_nor_averaged_nor_saved_and_is_recorded():
    module = build_module(model_config(terms={"repa": {"class_path": "igdit.objectives.REPALoss", "init_args": {
        "block": 2, "projector_dim": 16, "encoder": {"class_path": f"{__name__}.RandomConvEncoder"}}}}))
    term = module.objective["repa"]
    term.setup(torch.device("cpu"))
    encoder_params = {id(p) for p in term.encoder.frozen.net.parameters()}
    optimizer = module.configure_optimizers()["optimizer"]  # the default experiment has a warm-up schedule
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not encoder_params & optimised
    assert {id(p) for p in term.projector.parameters()} <= optimised
    keys = list(module.state_dict())
    assert any(k.startswith("objective.repa.projector.") for k in keys)
    assert not any("encoder" in k for k in keys)
    copied = copy.deepcopy(module)  # what EMAWeightAveraging does to the module
    assert copied.objective["repa"].encoder.frozen is term.encoder.frozen
    assert term.frozen_networks() == {"encoder": {"source": "random conv", "sha256": "none"}}


def test_images_are_x_for_pixel_data_and_decoded_latents_otherwise(tiny_vae):
    from igdit.data import DiffusersVAE, LatentNormalizer

    x = torch.randn(2, 4, 4, 4)
    z = torch.zeros_like(x)
    plain = LossInputs(x=x, noise=z, t=torch.zeros(2), x_t=z, target=z, y=torch.zeros(2, dtype=torch.long),
                       y_clean=torch.zeros(2, dtype=torch.long), output=DiTOutput(final=z), step=0)
    assert plain.images() is x  # no meta: pixel space
    vae = DiffusersVAE("diffusers:" + str(tiny_vae))
    normalizer = LatentNormalizer([0.1] * 4, [2.0] * 4)
    meta = {"encoder": vae.describe(), "normalizer": normalizer.to_dict()}
    latent = LossInputs(x=x.requires_grad_(), noise=z, t=torch.zeros(2), x_t=z, target=z,
                        y=torch.zeros(2, dtype=torch.long), y_clean=torch.zeros(2, dtype=torch.long),
                        output=DiTOutput(final=z), step=0, data_meta=meta)
    images = latent.images()
    expected = vae.decode(normalizer.denormalize(x.detach()))
    assert images.shape == (2, 3, 8, 8) and not images.requires_grad
    torch.testing.assert_close(images, expected)
    assert latent.images() is images  # decoded once per batch


# ---- DINOv2 through timm (the real class, tiny random weights) -------------------------------------------------
TINY_VIT = {"embed_dim": 32, "depth": 1, "num_heads": 2}


def _save_tiny_dinov2(path: Path, img_size: int) -> dict:
    import timm

    torch.manual_seed(3)
    net = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, img_size=img_size, **TINY_VIT)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = net.state_dict()
    torch.save(state, path)
    return state


def test_dinov2_loads_a_local_file_resamples_its_grid_and_gives_normalised_patch_tokens(tmp_path):
    saved = _save_tiny_dinov2(tmp_path / "dinov2.pth", img_size=28)  # 2x2 patches of 14 pixels
    encoder = DINOv2Encoder(model="vit_base_patch14_dinov2", weights=str(tmp_path / "dinov2.pth"), resolution=56,
                            model_args=TINY_VIT)
    assert (encoder.num_features, encoder.grid_size) == (32, 4)  # known before loading
    frozen = encoder.load("model.terms.repa.encoder")
    net = frozen.net
    torch.testing.assert_close(net.patch_embed.proj.weight, saved["patch_embed.proj.weight"])  # the file was read
    assert net.pos_embed.shape == (1, 1 + 16, 32)  # position embedding resampled from 2x2 to 4x4
    assert frozen.source == str(tmp_path / "dinov2.pth") and frozen.digest == file_digest(tmp_path / "dinov2.pth")
    assert not any(p.requires_grad for p in net.parameters()) and not net.training

    images = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    features = encoder.features(images)
    # REPA's preprocessing: /255, ImageNet mean/std, bicubic resize; then the normed tokens without the class token
    x = images.float().expand(-1, 3, -1, -1) / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (x - mean) / std
    x = F.interpolate(x, size=(56, 56), mode="bicubic")
    with torch.no_grad():
        expected = net.norm(net.blocks(net.norm_pre(net._pos_embed(net.patch_embed(x)))))[:, 1:]
    assert features.shape == (2, 16, 32)
    torch.testing.assert_close(features, expected)
    torch.testing.assert_close(encoder.features(images.float() / 127.5 - 1), features)  # [-1, 1] floats alike


@pytest.fixture()
def empty_caches(tmp_path, monkeypatch):
    """torch.hub's and the Hugging Face hub's caches pointed at empty folders."""
    from huggingface_hub import constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # torch.hub.get_dir() = $TORCH_HOME/hub
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    return tmp_path


def test_dinov2_is_found_in_the_torch_hub_cache(empty_caches):
    _save_tiny_dinov2(empty_caches / "torch" / "hub" / "checkpoints" / "dinov2_vitb14_pretrain.pth", img_size=56)
    encoder = DINOv2Encoder(model="vit_base_patch14_dinov2.lvd142m", resolution=56, model_args=TINY_VIT)
    assert encoder.load("f").source == str(empty_caches / "torch" / "hub" / "checkpoints" / "dinov2_vitb14_pretrain.pth")


def test_missing_dinov2_weights_are_a_one_line_error_naming_every_place_looked_in(empty_caches):
    encoder = DINOv2Encoder(model_args=TINY_VIT, resolution=56)
    with pytest.raises(ConfigError) as err:
        encoder.load("model.terms.repa.encoder")
    message = one_line(err.value)
    assert "\n" not in message and message.startswith("model.terms.repa.encoder.init_args.weights")
    assert str(empty_caches / "torch" / "hub" / "checkpoints" / "dinov2_vitb14_pretrain.pth") in message
    assert str(empty_caches / "hf-hub" / "models--timm--vit_base_patch14_dinov2.lvd142m") in message
    assert not list(empty_caches.rglob("*.pth")) and not list(empty_caches.rglob("*.safetensors"))  # no download
    with pytest.raises(ConfigError, match="looked in /nowhere/dinov2.pth"):
        DINOv2Encoder(weights="/nowhere/dinov2.pth", model_args=TINY_VIT).load("f")


# ---- the digits encoder ------------------------------------------------------------------------------------------
def test_digits_encoder_is_trained_once_on_the_shards_cached_and_not_the_metric_network(digits_root):
    from igdit.metrics.features import DigitsFeatureNet

    datamodule = LatentDataModule(str(digits_root))
    encoder = DigitsPatchEncoder(epochs=4)
    frozen = encoder.load("model.terms.repa.encoder", datamodule)
    path = Path(frozen.source)
    assert path.parent == digits_root / "fid_refs" and path.name.startswith("repa_digits-") and path.is_file()
    assert frozen.digest == file_digest(path)
    assert not isinstance(frozen.net, DigitsFeatureNet) and encoder.info["seed"] == 1
    assert encoder.info["val_accuracy"] > 0.5  # four epochs already carry digit information (40: ~0.95)
    again = DigitsPatchEncoder(epochs=4)
    assert again.load("f", datamodule).digest == frozen.digest  # read from the cache, not retrained
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    assert encoder.features(images).shape == (3, 16, 64)
    with pytest.raises(ConfigError, match="needs the shards"):
        DigitsPatchEncoder().load("model.terms.repa.encoder", None)


# ---- SRA ---------------------------------------------------------------------------------------------------------
def test_sra_teacher_time_is_t_minus_uniform_t_max_clamped_at_zero():
    t = torch.tensor([0.05, 0.5, 0.9, 1.0])
    u = torch.rand(4, generator=torch.Generator().manual_seed(7))
    got = teacher_times(t, 0.2, torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, (t - 0.2 * u).clamp(min=0))
    assert (got <= t).all() and (got >= t - 0.2).all() and (got >= 0).all()
    assert got[0] == 0 or u[0] * 0.2 < 0.05  # the clamp at the clean end


def test_sra_smooth_l1_and_per_token_cosine_by_hand():
    pred = torch.tensor([[[0.01, 1.0]]])  # one token, two features
    target = torch.zeros(1, 1, 2)
    # smooth-L1, beta 0.05: |d| < beta -> 0.5 d^2 / beta = 0.001; else |d| - beta / 2 = 0.975
    torch.testing.assert_close(sra_distance(pred, target, "smooth_l1", 0.05), torch.tensor([(0.001 + 0.975) / 2]))
    # cosine per token: tokens [1,0]/[1,0] (cos 1) and [0,1]/[1,0] (cos 0) -> 1 - 0.5
    pred = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    torch.testing.assert_close(sra_distance(pred, target, "cos"), torch.tensor([0.5]))
    # the public code's F.cosine_similarity(pred, target) (dim=1: across tokens) gives another number
    quirk = 1 - F.cosine_similarity(pred, target).mean()
    assert abs(quirk.item() - 0.5) > 0.1


def test_sra_teacher_is_the_ema_backbone_at_t_prime_same_noise_same_dropped_labels_no_grad_eval():
    backbone = tiny_backbone()
    ema = copy.deepcopy(backbone).train()
    term = SRALoss(block=2, teacher_block=4)
    objective = attached(term, backbone)
    inputs = batch_inputs(objective, backbone, ema_backbone=ema)
    inputs.y_clean = (inputs.y + 1) % 10  # the teacher must see y (dropped labels), never y_clean
    inputs.generator = torch.Generator().manual_seed(11)
    seen, blocks_run = {}, []

    def record(module, args, kwargs):
        seen.update(x=args[0], t=args[1], y=args[2], grad=torch.is_grad_enabled(), training=module.training, **kwargs)
    ema.register_forward_pre_hook(record, with_kwargs=True)
    for i, block in enumerate(ema.blocks):
        block.register_forward_hook(lambda *a, i=i: blocks_run.append(i + 1))
    term.per_sample(inputs)

    t_prime = teacher_times(inputs.t, 0.2, torch.Generator().manual_seed(11))
    torch.testing.assert_close(seen["t"], t_prime)
    torch.testing.assert_close(seen["x"], (1 - t_prime).view(-1, 1, 1, 1) * inputs.x + t_prime.view(-1, 1, 1, 1)
                               * inputs.noise)  # re-interpolated with the same noise
    assert torch.equal(seen["y"], inputs.y)
    assert seen["grad"] is False and seen["training"] is False and ema.training  # eval for the pass, then restored
    assert seen["stop_after"] == 4 and blocks_run == [1, 2, 3, 4]  # stops at the teacher block

    with torch.no_grad():
        expected_target = ema.eval()(seen["x"], t_prime, inputs.y, hidden=[4]).hidden[4]
    inputs.generator = torch.Generator().manual_seed(11)
    expected = sra_distance(term.projector(inputs.output.hidden[2]), expected_target, "smooth_l1", 0.05)
    torch.testing.assert_close(term.per_sample(inputs), expected)


def test_sra_weight_schedule_decays_tenfold_per_period_after_its_start():
    term = SRALoss(weight=0.2, block=2, teacher_block=4, schedule={"start_step": 100, "steps": 1000})
    assert term.weight_at(0) == term.weight_at(100) == 0.2
    assert term.weight_at(1100) == pytest.approx(0.02)
    assert term.weight_at(600) == pytest.approx(0.2 * 10 ** -0.5)
    assert SRALoss().weight_at(10 ** 9) == 0.2  # no schedule: constant
    # the objective's total uses the scheduled weight
    backbone = tiny_backbone()
    objective = attached(term, backbone)
    inputs = batch_inputs(objective, backbone, ema_backbone=copy.deepcopy(backbone), step=1100)
    total, values = objective(inputs)
    torch.testing.assert_close(total, 0.2 * 0.1 * values["term"])
    assert values["term/weight"].item() == pytest.approx(0.02)


def test_sra_without_ema_is_a_one_line_error():
    backbone = tiny_backbone()
    term = SRALoss(block=2, teacher_block=4)
    objective = attached(term, backbone)
    with pytest.raises(ConfigError) as err:
        term.per_sample(batch_inputs(objective, backbone, ema_backbone=None))
    assert "\n" not in one_line(err.value) and "EMAWeightAveraging" in one_line(err.value)


def test_module_reads_the_averaged_weights_of_lightnings_ema_callback():
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EMAWeightAveraging

    module = build_module(model_config(terms={"sra": {"class_path": "igdit.objectives.SRALoss",
                                                      "init_args": {"block": 2, "teacher_block": 4}}}))
    assert module.ema_backbone is None  # no trainer
    ema = EMAWeightAveraging(decay=0.9)
    trainer = pl.Trainer(callbacks=[ema], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module.trainer = trainer
    ema.setup(trainer, module, "fit")
    trainer.training = True
    assert module.ema_backbone is ema._average_model.module.backbone and module.ema_backbone is not module.backbone
    trainer.validating = True  # the callback has swapped the averaged weights into the module
    assert module.ema_backbone is module.backbone
    plain = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module.trainer = plain
    plain.training = True
    assert module.ema_backbone is None


# ---- LayerSync and the dispersive loss ---------------------------------------------------------------------------
def test_layersync_is_minus_mean_token_cosine_with_the_deeper_block_by_hand():
    h2 = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    h4 = torch.tensor([[[2.0, 0.0], [-1.0, 0.0]]])
    term = LayerSyncLoss(block=2, target_block=4)
    attached(term)
    got = term.per_sample(_inputs_with(hidden_output(h2=h2, h4=h4), n=1))
    torch.testing.assert_close(got, torch.tensor([-(1.0 - 1 / math.sqrt(2)) / 2]))
    assert term.hidden_needed(0) == (2, 4)


def test_dispersive_loss_by_hand_with_the_diagonal():
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])  # squared distances 1, 4, 5; d = 2
    tau = 0.5  # d * tau = 1
    expected = math.log((3 + 2 * (math.exp(-1) + math.exp(-4) + math.exp(-5))) / 9)
    assert dispersive_loss(z, tau).item() == pytest.approx(expected, rel=1e-6)
    assert dispersive_loss(z.view(3, 1, 2), tau).item() == pytest.approx(expected, rel=1e-6)  # flattened
    far = torch.eye(4) * 1e3
    assert dispersive_loss(far, 1.0).item() == pytest.approx(-math.log(4))  # the floor -log B: only the diagonal


def test_dispersive_term_keeps_only_samples_in_t_range_and_defaults_to_depth_over_four():
    term = DispersiveLoss(tau=1.0, t_range=(0.2, 0.6))
    attached(term, tiny_backbone(depth=8))
    assert term.block == 2 and term.hidden_needed(0) == (2,)
    z = torch.randn(4, 3, 5)
    t = torch.tensor([0.1, 0.3, 0.5, 0.9])
    got = term(_inputs_with(hidden_output(h2=z), t=t, n=4))
    torch.testing.assert_close(got, dispersive_loss(z[1:3], 1.0))
    alone = term(_inputs_with(hidden_output(h2=z), t=torch.tensor([0.1, 0.3, 0.9, 0.9]), n=4))
    assert alone.item() == 0.0


# ---- gradient routing with only the term active ---------------------------------------------------------------
def _routing(term, ema=False):
    backbone = tiny_backbone()
    objective = attached(term, backbone)
    for t in objective.values():
        t.setup(torch.device("cpu"))
    teacher = copy.deepcopy(backbone) if ema else None  # AveragedModel's copy: requires_grad stays True
    loss, _ = objective(batch_inputs(objective, backbone, ema_backbone=teacher))
    loss.backward()
    return backbone, grads_by_block(backbone), teacher


@pytest.mark.parametrize("make,supervised", [
    (lambda: REPALoss(RandomConvEncoder(), block=2, projector_dim=8), 2),
    (lambda: SRALoss(block=2, teacher_block=4), 2),
    (lambda: LayerSyncLoss(block=2, target_block=4), 2),
    (lambda: DispersiveLoss(block=3), 3),
], ids=["repa", "sra", "layersync", "dispersive"])
def test_only_blocks_up_to_the_supervised_one_get_gradient(make, supervised):
    term = make()
    backbone, grads, teacher = _routing(term, ema=isinstance(term, SRALoss))
    assert all(grads[i] for i in range(1, supervised + 1)), grads
    assert not any(grads[i] for i in range(supervised + 1, 7)), grads  # LayerSync: block 4 too (the target is sg)
    assert all(p.grad is None for p in backbone.final_layer.parameters())
    if hasattr(term, "projector"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.projector.parameters())
    if isinstance(term, REPALoss):
        assert all(p.grad is None for p in term.encoder.frozen.net.parameters())
    if teacher is not None:
        assert all(p.grad is None for p in teacher.parameters())  # no graph through the EMA teacher


# ---- one-line errors before compute ---------------------------------------------------------------------------------
@pytest.mark.parametrize("make,field", [
    (lambda: REPALoss(RandomConvEncoder(), block=7), "block"),
    (lambda: REPALoss(RandomConvEncoder(), block=0), "block"),
    (lambda: SRALoss(block=2, teacher_block=9), "teacher_block"),
    (lambda: LayerSyncLoss(block=4, target_block=2), "block"),
    (lambda: LayerSyncLoss(block=2, target_block=7), "target_block"),
    (lambda: DispersiveLoss(block=7), "block"),
])
def test_blocks_outside_the_backbone_are_one_line_errors(make, field):
    with pytest.raises(ConfigError) as err:
        attached(make())
    message = one_line(err.value)
    assert "\n" not in message and message.startswith(f"model.terms.term.{field}:")


# ---- end to end through the real CLI ------------------------------------------------------------------------------
def _fit_config(tmp_path: Path, name: str, ema: bool = True, **term_args) -> Path:
    """experiments/<name>.yaml shortened: 20 steps of batch 32, validation at the end on 2 batches, no FID or grid."""
    cfg = yaml.safe_load((REPO / "experiments" / f"{name}.yaml").read_text())
    cfg["trainer"].update(max_steps=20, val_check_interval=20, limit_val_batches=2, log_every_n_steps=4,
                          enable_progress_bar=False)
    cfg["data"]["batch_size"] = 32
    callbacks = []
    for cb in cfg["trainer"]["callbacks"]:
        kind = cb["class_path"].rsplit(".", 1)[-1]
        if kind == "EMAWeightAveraging" and ema:
            cb["init_args"].update(decay=0.9, update_starting_at_step=0)
            callbacks.append(cb)
        elif kind == "Checkpoint" and "every_n_train_steps" in cb["init_args"]:
            cb["init_args"]["every_n_train_steps"] = 20
            callbacks.append(cb)
    cfg["trainer"]["callbacks"] = callbacks
    for term in cfg["model"]["terms"].values():
        if term["class_path"].startswith("igdit.objectives.") and term["class_path"] not in (
                "igdit.objectives.DiffusionLoss", "igdit.objectives.ExitLoss"):
            for key, value in term_args.items():
                target = term["init_args"]
                *path, last = key.split(".")
                for part in path:
                    target = target[part]
                target[last] = value
    path = tmp_path / f"{name}-short.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit_args(config: Path, root: Path, scratch: Path) -> list[str]:
    return ["fit", "--config", str(config), "--data.root", str(root), "--data.num_workers", "0",
            "--trainer.logger.init_args.tracking_uri", f"sqlite:///{scratch / 'mlflow.db'}",
            "--trainer.logger.init_args.artifact_location", (scratch / "mlartifacts").as_uri(),
            "--trainer.default_root_dir", str(scratch / "runs")]


@pytest.mark.slow
@pytest.mark.parametrize("name,term,extra", [
    ("repa_digits", "repa", {"encoder.init_args.epochs": 4}),  # the cache of the encoder test
    ("sra_digits", "sra", {}),
], ids=["repa", "sra"])
def test_short_fit_logs_the_term_and_checkpoints_the_projector_not_the_frozen_network(
        name, term, extra, digits_root, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from igdit.checkpoints import load_module

    assert main(_fit_args(_fit_config(tmp_path, name, **extra), digits_root, tmp_path)) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("igdit-digits").experiment_id])[0]
    history = client.get_metric_history(run.info.run_id, f"train/{term}")
    assert len(history) >= 5 and all(math.isfinite(m.value) for m in history)
    assert f"val/{term}" in run.data.metrics

    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    for weights in (checkpoint["state_dict"], checkpoint["current_model_state"]):
        assert any(k.startswith(f"objective.{term}.projector.") for k in weights)
        assert not any("encoder" in k or "teacher" in k or "_average" in k for k in weights)
    if term == "repa":
        frozen = checkpoint["hyper_parameters"]["frozen_networks"]["repa.encoder"]
        assert frozen["sha256"] == file_digest(frozen["source"])
        assert Path(frozen["source"]).parent == digits_root / "fid_refs"
    reloaded = load_module(ckpt)
    assert torch.equal(reloaded.objective[term].projector[0].weight,
                       checkpoint["state_dict"][f"objective.{term}.projector.0.weight"])


def test_sra_fit_without_ema_callback_stops_with_one_line_before_training(digits_root, tmp_path, capsys):
    assert main(_fit_args(_fit_config(tmp_path, "sra_digits", ema=False), digits_root, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: model.terms.sra") and "EMAWeightAveraging" in err
    assert not list(tmp_path.rglob("*.ckpt"))
