"""SD 2.1 autoencoder (ldm's AutoencoderKL), split into the two stages OSDiff runs:

    vae_encoder:  x in [0,1] -> 2x-1 -> Encoder -> quant_conv -> moments (mean | logvar)
                  y0 = mean * 0.18215                    (the posterior mode; logvar unused)
    vae_decoder:  y -> y * (1/0.18215) -> post_quant_conv -> Decoder -> ((x+1)/2).clamp(0,1)

Attribute names are ldm's (`down.{i}.block.{j}`, `mid.attn_1`, `nin_shortcut`, ...) so each
stage's state_dict keys are the checkpoint's "first_stage_model." keys under a fixed prefix
(export/checkpoint.py, STAGE_PREFIXES). SD 2.1 has no attention inside the down/up levels
(attn_resolutions is empty), only in the middle block, so the levels hold no `attn` lists.

GroupNorm statistics and the mid-block attention run in float32 whatever the module dtype:
these are the fp32 islands of the fp16 graphs (calibration/precision.py). In an fp32 module
the casts are no-ops.
"""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from osdiff.config import VAEConfig
from osdiff.export.models.attention import attention


def _float32(v: float) -> float:
    """The float32 value nearest to v, as a Python float: the constant the reference's float32
    tensors are really multiplied by."""
    return float(np.float32(v))


class GroupNorm(nn.GroupNorm):
    """ldm's `Normalize`: 32 groups (VAEConfig.norm_groups), eps 1e-6, statistics in float32."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__(groups, channels, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        # fp16 variance over a whole group of a 512x768 image loses too much precision
        out = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


def conv3x3(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, padding=1)


class ResnetBlock(nn.Module):
    """norm, swish, conv, norm, swish, conv, plus a 1x1 shortcut where the width changes.
    The autoencoder has no timestep input, so there is no `temb_proj`."""

    def __init__(self, in_ch: int, out_ch: int, groups: int = 32):
        super().__init__()
        self.norm1 = GroupNorm(in_ch, groups)
        self.conv1 = conv3x3(in_ch, out_ch)
        self.norm2 = GroupNorm(out_ch, groups)
        self.conv2 = conv3x3(out_ch, out_ch)
        # Identity holds no parameters, so the keys stay ldm's
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, the head being all C channels; q, k, v
    and the output projection are 1x1 convs. Exact, with memory linear in the positions."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = GroupNorm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        # B x C x H x W -> B x HW x C, one head; float32 because the C^-0.5-scaled logits of real
        # images exceed the fp16 range (attention's scale is the C^-0.5 of the reference)
        q, k, v = (conv(h).flatten(2).transpose(1, 2).float() for conv in (self.q, self.k, self.v))
        out = attention(q, k, v, heads=1)
        out = out.transpose(1, 2).reshape(x.shape).to(x.dtype)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halves the resolution; the zero padding is on the right and bottom only (odd sides
    therefore round up: 9 -> 5)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownLevel(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, downsample: bool, groups: int = 32):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(num_blocks))
        self.downsample = Downsample(out_ch) if downsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x)


class UpLevel(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, upsample: bool, groups: int = 32):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(num_blocks))
        self.upsample = Upsample(out_ch) if upsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image in [-1,1] -> 2*z_channels moments at 1/2^(levels-1) resolution (double_z)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = conv3x3(cfg.in_channels, cfg.ch)
        self.down = nn.ModuleList(
            DownLevel(cfg.ch if i == 0 else widths[i - 1], widths[i], cfg.num_res_blocks, i != last, cfg.norm_groups)
            for i in range(len(widths))
        )
        self.mid = MidBlock(widths[-1], cfg.norm_groups)
        self.norm_out = GroupNorm(widths[-1], cfg.norm_groups)
        self.conv_out = conv3x3(widths[-1], 2 * cfg.z_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z_channels latent -> image in about [-1,1]. `up[i]` is level i (up[0] the full-resolution
    one), so the levels run in reverse index order; each has num_res_blocks + 1 blocks."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = conv3x3(cfg.z_channels, widths[-1])
        self.mid = MidBlock(widths[-1], cfg.norm_groups)
        self.up = nn.ModuleList(
            UpLevel(widths[min(i + 1, last)], widths[i], cfg.num_res_blocks + 1, i != 0, cfg.norm_groups)
            for i in range(len(widths))
        )
        self.norm_out = GroupNorm(widths[0], cfg.norm_groups)
        self.conv_out = conv3x3(widths[0], cfg.out_ch)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAEEncoder(nn.Module):
    """Stage "vae_encoder": image in [0,1] -> y0 = posterior mean * scale_factor."""

    def __init__(self, cfg: VAEConfig, scale_factor: float = 0.18215):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.embed_dim = cfg.embed_dim
        self.scale = _float32(scale_factor)

    def moments(self, x: Tensor) -> Tensor:
        """quant_conv output: channels [0, embed_dim) the mean, the rest the log-variance."""
        return self.quant_conv(self.encoder(x * 2 - 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.moments(x)[:, : self.embed_dim] * self.scale


class VAEDecoder(nn.Module):
    """Stage "vae_decoder": latent y -> image in [0,1]."""

    def __init__(self, cfg: VAEConfig, scale_factor: float = 0.18215):
        super().__init__()
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)
        # The reference multiplies by 1/scale_factor (rounded to float32) rather than dividing
        # by scale_factor; the two differ by one ulp in about a fifth of the elements.
        self.inv_scale = _float32(1.0 / scale_factor)

    def decode_raw(self, y: Tensor) -> Tensor:
        """Decoder output before the [0,1] mapping: about [-1,1], unclamped."""
        return self.decoder(self.post_quant_conv(y * self.inv_scale))

    def forward(self, y: Tensor) -> Tensor:
        return ((self.decode_raw(y) + 1) / 2).clamp(0, 1)
