"""The LDM KL autoencoder as a plain function of its state dict: a transcription of the official VA-VAE code
(LightningDiT/tokenizer/autoencoder.py: Encoder, Decoder, ResnetBlock, AttnBlock, Downsample, Upsample,
DiagonalGaussianDistribution), and random state dicts in its exact key layout, for tests."""
import torch
import torch.nn.functional as F


def ldm_state_dict(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=32, attn_levels=(4,),
                   in_channels=3, out_ch=3, seed=0, extra=True, meta=False) -> dict:
    """Random weights with the official AutoencoderKL's keys and shapes (``attn_levels``: the levels whose
    resolution is in attn_resolutions; VA-VAE at 256 px: level 4 = 16 x 16). ``extra`` adds keys of the
    VA-VAE checkpoint that are not part of the autoencoder (loss, DINOv2 alignment projection). ``meta``: shapes
    only (tensors on the meta device), for the full-size layout."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    randn = (lambda *shape, generator: torch.empty(*shape, device="meta")) if meta else torch.randn

    def conv(name, cout, cin, k):
        sd[f"{name}.weight"] = randn(cout, cin, k, k, generator=g) * (1.0 / (cin * k * k)) ** 0.5
        sd[f"{name}.bias"] = 0.05 * randn(cout, generator=g)

    def norm(name, c):
        sd[f"{name}.weight"] = 1 + 0.1 * randn(c, generator=g)
        sd[f"{name}.bias"] = 0.1 * randn(c, generator=g)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    levels = len(ch_mult)
    conv("encoder.conv_in", ch, in_channels, 3)
    block_in = ch
    for i in range(levels):
        block_out = ch * ch_mult[i]
        for j in range(num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if i in attn_levels:
                attn(f"encoder.down.{i}.attn.{j}", block_in)
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    resnet("encoder.mid.block_1", block_in, block_in)
    attn("encoder.mid.attn_1", block_in)
    resnet("encoder.mid.block_2", block_in, block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", 2 * z_channels, block_in, 3)
    conv("quant_conv", 2 * z_channels, 2 * z_channels, 1)
    conv("post_quant_conv", z_channels, z_channels, 1)
    block_in = ch * ch_mult[-1]
    conv("decoder.conv_in", block_in, z_channels, 3)
    resnet("decoder.mid.block_1", block_in, block_in)
    attn("decoder.mid.attn_1", block_in)
    resnet("decoder.mid.block_2", block_in, block_in)
    for i in reversed(range(levels)):
        block_out = ch * ch_mult[i]
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if i in attn_levels:
                attn(f"decoder.up.{i}.attn.{j}", block_in)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", out_ch, block_in, 3)
    if extra:
        sd["loss.logvar"] = torch.zeros(())
        sd["linear_proj.weight"] = randn(8, z_channels, 1, 1, generator=g)
    return sd


def _gn(x, sd, name):
    return F.group_norm(x, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)


def _conv(x, sd, name, **kw):
    return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], **kw)


def _resnet(x, sd, name):
    h = _conv(F.silu(_gn(x, sd, f"{name}.norm1")), sd, f"{name}.conv1", padding=1)
    h = _conv(F.silu(_gn(h, sd, f"{name}.norm2")), sd, f"{name}.conv2", padding=1)
    if f"{name}.nin_shortcut.weight" in sd:
        x = _conv(x, sd, f"{name}.nin_shortcut")
    return x + h


def _attn(x, sd, name):
    h = _gn(x, sd, f"{name}.norm")
    q, k, v = (_conv(h, sd, f"{name}.{p}") for p in "qkv")
    b, c, hh, ww = q.shape
    q = q.reshape(b, c, hh * ww).permute(0, 2, 1)
    w = torch.softmax(torch.bmm(q, k.reshape(b, c, hh * ww)) * int(c) ** (-0.5), dim=2)
    out = torch.bmm(v.reshape(b, c, hh * ww), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _conv(out, sd, f"{name}.proj_out")


def _levels(sd, part, kind):
    return sorted({int(k.split(".")[2]) for k in sd if k.startswith(f"{part}.{kind}.")})


def ldm_encode(sd, x):
    """Encoder -> quant_conv -> DiagonalGaussianDistribution: (mean, std), logvar clamped to [-30, 20]."""
    h = _conv(x, sd, "encoder.conv_in", padding=1)
    levels = _levels(sd, "encoder", "down")
    for i in levels:
        blocks = sorted({int(k.split(".")[4]) for k in sd if k.startswith(f"encoder.down.{i}.block.")})
        for j in blocks:
            h = _resnet(h, sd, f"encoder.down.{i}.block.{j}")
            if f"encoder.down.{i}.attn.{j}.q.weight" in sd:
                h = _attn(h, sd, f"encoder.down.{i}.attn.{j}")
        if i != levels[-1]:
            h = _conv(F.pad(h, (0, 1, 0, 1)), sd, f"encoder.down.{i}.downsample.conv", stride=2)
    h = _resnet(h, sd, "encoder.mid.block_1")
    h = _attn(h, sd, "encoder.mid.attn_1")
    h = _resnet(h, sd, "encoder.mid.block_2")
    h = _conv(F.silu(_gn(h, sd, "encoder.norm_out")), sd, "encoder.conv_out", padding=1)
    mean, logvar = _conv(h, sd, "quant_conv").chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


def ldm_decode(sd, z):
    """post_quant_conv -> Decoder: (N, z, h, w) -> (N, 3, H, W), not clamped."""
    h = _conv(_conv(z, sd, "post_quant_conv"), sd, "decoder.conv_in", padding=1)
    h = _resnet(h, sd, "decoder.mid.block_1")
    h = _attn(h, sd, "decoder.mid.attn_1")
    h = _resnet(h, sd, "decoder.mid.block_2")
    for i in reversed(_levels(sd, "decoder", "up")):
        blocks = sorted({int(k.split(".")[4]) for k in sd if k.startswith(f"decoder.up.{i}.block.")})
        for j in blocks:
            h = _resnet(h, sd, f"decoder.up.{i}.block.{j}")
            if f"decoder.up.{i}.attn.{j}.q.weight" in sd:
                h = _attn(h, sd, f"decoder.up.{i}.attn.{j}")
        if i != 0:
            h = _conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, f"decoder.up.{i}.upsample.conv", padding=1)
    return _conv(F.silu(_gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out", padding=1)
