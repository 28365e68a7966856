"""VA-VAE f16d32 (and any LDM KL autoencoder) as a diffusers AutoencoderKL: the config read off the checkpoint,
diffusers' converter plus the in-level attention, numerical parity with a transcription of the official
autoencoder, the latents_stats.pt normaliser, and one-line errors."""
import pytest
import torch

from igdit.config import ConfigError
from igdit.data import build_encoder, decode_latents
from igdit.data.encoders import VAVAE, LatentNormalizer, load_latent_stats
from igdit.data.ldm_vae import convert_ldm_vae, ldm_autoencoder, ldm_vae_config, read_ldm_checkpoint
from ldm_vae_reference import ldm_decode, ldm_encode, ldm_state_dict

VAVAE_CONFIG = {"in_channels": 3, "out_channels": 3, "block_out_channels": [128, 128, 256, 256, 512],
                "down_block_types": ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"],
                "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 4, "layers_per_block": 2,
                "latent_channels": 32, "norm_num_groups": 32, "mid_block_add_attention": True}


@pytest.fixture(scope="module")
def tiny_ldm(tmp_path_factory):
    """A tiny VA-VAE-layout LDM checkpoint (ch 32, ch_mult (1, 1, 2, 2, 4), 32 latent channels, attention in the
    lowest level), saved as the official training writes it: a Lightning checkpoint with a state_dict."""
    sd = ldm_state_dict(ch=32)
    path = tmp_path_factory.mktemp("vavae") / "tiny-vavae.pt"
    torch.save({"state_dict": sd, "global_step": 3}, path)
    return path, sd


def test_the_full_size_vavae_layout_converts_key_for_key():
    sd = ldm_state_dict(ch=128, meta=True)  # the real VA-VAE f16d32 shapes, no memory
    config = ldm_vae_config(sd)
    assert {k: config[k] for k in VAVAE_CONFIG} == VAVAE_CONFIG
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        expected = AutoencoderKL(**config).state_dict()
    converted, left_out = convert_ldm_vae(sd, config)
    assert set(converted) == set(expected) and left_out == ["linear_proj.weight", "loss.logvar"]
    assert all(tuple(converted[k].shape) == tuple(expected[k].shape) for k in expected)
    assert len(converted) == len(sd) - 2  # one diffusers tensor per LDM autoencoder tensor
    # the in-level attention of the 16 x 16 level, in diffusers' numbering (decoder levels reversed)
    assert tuple(converted["encoder.down_blocks.4.attentions.1.to_q.weight"].shape) == (512, 512)
    assert tuple(converted["decoder.up_blocks.0.attentions.2.to_out.0.weight"].shape) == (512, 512)
    # 2 + 3 in-level attention blocks plus the mid ones; downsampling 16
    assert sum(p.numel() for p in expected.values()) == sum(v.numel() for k, v in sd.items()
                                                            if not k.startswith(("loss", "linear_proj")))


def test_converted_autoencoder_computes_what_the_official_one_computes(tiny_ldm):
    path, sd = tiny_ldm
    vae, config, left_out = ldm_autoencoder(path)
    assert config["block_out_channels"] == [32, 32, 64, 64, 128] and left_out == ["linear_proj.weight", "loss.logvar"]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(2, 32, 2, 2, generator=g)
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        mean, std = ldm_encode(sd, x)
        decoded, reference = vae.decode(z).sample, ldm_decode(sd, z)
    assert posterior.mean.shape == (2, 32, 2, 2)
    assert (posterior.mean - mean).abs().max() < 1e-5 and (posterior.std - std).abs().max() < 1e-5
    assert (decoded - reference).abs().max() < 1e-4 and reference.abs().max() > 0.5
    # a wrong attention mapping (q and k swapped in the lowest level) is caught by the same comparison
    swapped = dict(sd)
    swapped["encoder.down.4.attn.0.q.weight"], swapped["encoder.down.4.attn.0.k.weight"] = \
        sd["encoder.down.4.attn.0.k.weight"], sd["encoder.down.4.attn.0.q.weight"]
    assert (ldm_encode(swapped, x)[0] - mean).abs().max() > 1e-3


def test_vavae_encoder_round_trip_and_description(tiny_ldm):
    path, _ = tiny_ldm
    encoder = build_encoder(f"vavae-f16d32:{path}")
    assert isinstance(encoder, VAVAE) and encoder.latent_shape((3, 256, 256)) == (32, 16, 16)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    latents = encoder.encode(images, seeds=[0, 1, 2])
    assert latents.shape == (3, 32, 2, 2)
    mean, std = encoder.posterior(images)
    assert torch.allclose(latents[0], mean[0] + std[0] * torch.randn(32, 2, 2, generator=torch.Generator().manual_seed(0)))
    decoded = encoder.decode(latents)
    assert decoded.shape == (3, 3, 32, 32) and decoded.min() >= -1 and decoded.max() <= 1
    described = encoder.describe()
    assert described["name"] == "vavae-f16d32" and described["path"] == str(path.resolve())
    assert (described["latent_channels"], described["downsampling"], described["format"]) == (32, 16, "ldm")
    again = build_encoder(described)  # meta.json rebuilds the same encoder (the loaded model is shared)
    assert again.vae is encoder.vae
    normalizer = LatentNormalizer([0.5] * 32, [2.0] * 32)
    meta = {"encoder": described, "normalizer": normalizer.to_dict()}
    assert torch.allclose(decode_latents(normalizer.normalize(latents), meta), decoded, atol=1e-5)


def test_latents_stats_normaliser_is_the_official_one(tmp_path):
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(1, 32, 1, 1, generator=g), torch.rand(1, 32, 1, 1, generator=g) + 0.5
    torch.save({"mean": mean, "std": std}, tmp_path / "latents_stats.pt")
    z = torch.randn(4, 32, 16, 16, generator=g)
    for multiplier in (1.0, 0.5):
        norm = load_latent_stats(str(tmp_path / "latents_stats.pt"), multiplier)
        # ImgLatentDataset: (z - mean) / std * multiplier; inference.py: x * std / multiplier + mean
        assert torch.allclose(norm.normalize(z), (z - mean) / std * multiplier, atol=1e-5)
        assert torch.allclose(norm.denormalize(norm.normalize(z)), z, atol=1e-5)
    torch.save({"mean": mean}, tmp_path / "bad.pt")
    for path, match in [(tmp_path / "nope.pt", r"^--latent_stats: .*no such file"),
                        (tmp_path / "bad.pt", r"^--latent_stats: .*'mean' and 'std'")]:
        with pytest.raises(ConfigError, match=match):
            load_latent_stats(str(path))


def test_bad_checkpoints_are_one_line(tmp_path, tiny_ldm):
    path, sd = tiny_ldm
    with pytest.raises(ConfigError, match=r"^encoder: .*no such file"):
        build_encoder(f"vavae-f16d32:{tmp_path / 'nope.pt'}")
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match=r"^encoder: .*(not|expected) an LDM autoencoder"):
        read_ldm_checkpoint(tmp_path / "other.pt")
    broken = {k: v for k, v in sd.items() if k != "decoder.up.2.block.1.conv1.weight"}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(ConfigError, match=r"decoder\.up_blocks\.2\.resnets\.1\.conv1\.weight"):
        ldm_autoencoder(tmp_path / "broken.pt")
    # an LDM VAE with 16 latent channels is not an f16d32 one; ldm-vae takes it
    torch.save(ldm_state_dict(ch=32, z_channels=16, extra=False), tmp_path / "d16.pt")
    with pytest.raises(ConfigError, match=r"^encoder: .*16 latent channels and downsampling 16; vavae-f16d32 has 32"):
        build_encoder(f"vavae-f16d32:{tmp_path / 'd16.pt'}")
    assert build_encoder(f"ldm-vae:{tmp_path / 'd16.pt'}").channels == 16
