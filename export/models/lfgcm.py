"""LFGCM: OSDiff's learned latent codec, the networks only (no entropy coding here).

    y0 --g_a--> y --h_a--> z  ...EntropyBottleneck...  z_hat --h_s--> hyper_params
    per slice k, per checkerboard half: hyper_params [+ channel context of slices < k]
        [+ 5x5 local context of the slice's decoded anchors] --> (scales, means)
    y_hat --g_s--> y_c (the control hint, twice the resolution of y)

Module and attribute names are those of the original `model/lfgcm.py` and of the layer
classes it imports (CompressAI/ELIC-style blocks), so each stage's state_dict keys are the
checkpoint's keys under a fixed prefix (export/checkpoint.py, STAGE_PREFIXES).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from osdiff.config import LFGCMConfig

# ---------------------------------------------------------------------------------------------
# Checkerboard layout. Anchors are the positions with row + column odd; each half is coded in
# a "squeezed" layout of width W/2 in which row r keeps the columns of its kind in order.
# Strided slices, stack and flatten only, so the graphs export to ONNX without gathers.
# Needs even H and W (y is 1/16 of the padded image side, a multiple of 4).
# ---------------------------------------------------------------------------------------------


def squeeze_anchor(x: Tensor) -> Tensor:
    """B x C x H x W -> B x C x H x W/2: the anchors (even rows: odd columns; odd rows: even)."""
    return torch.stack((x[:, :, 0::2, 1::2], x[:, :, 1::2, 0::2]), dim=3).flatten(2, 3)


def squeeze_nonanchor(x: Tensor) -> Tensor:
    """B x C x H x W -> B x C x H x W/2: the non-anchors (even rows: even columns; odd rows: odd)."""
    return torch.stack((x[:, :, 0::2, 0::2], x[:, :, 1::2, 1::2]), dim=3).flatten(2, 3)


def unsqueeze_anchor(s: Tensor) -> Tensor:
    """Inverse of squeeze_anchor: B x C x H x W/2 -> B x C x H x W, zeros at non-anchors."""
    even, odd = s[:, :, 0::2], s[:, :, 1::2]
    zero = torch.zeros_like(even)
    even = torch.stack((zero, even), dim=-1).flatten(-2)
    odd = torch.stack((odd, zero), dim=-1).flatten(-2)
    return torch.stack((even, odd), dim=3).flatten(2, 3)


def unsqueeze_nonanchor(s: Tensor) -> Tensor:
    """Inverse of squeeze_nonanchor: B x C x H x W/2 -> B x C x H x W, zeros at anchors."""
    even, odd = s[:, :, 0::2], s[:, :, 1::2]
    zero = torch.zeros_like(even)
    even = torch.stack((even, zero), dim=-1).flatten(-2)
    odd = torch.stack((zero, odd), dim=-1).flatten(-2)
    return torch.stack((even, odd), dim=3).flatten(2, 3)


# ---------------------------------------------------------------------------------------------
# Building blocks (CompressAI conventions: "conv" is 5x5 stride 2, "deconv" its transpose)
# ---------------------------------------------------------------------------------------------


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride)


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1)


def conv(in_ch: int, out_ch: int, kernel_size: int = 5, stride: int = 2) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2)


def deconv(in_ch: int, out_ch: int, kernel_size: int = 5, stride: int = 2) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(
        in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, output_padding=stride - 1
    )


def subpel_conv1x1(in_ch: int, out_ch: int, r: int = 2) -> nn.Sequential:
    return nn.Sequential(conv1x1(in_ch, out_ch * r * r), nn.PixelShuffle(r))


class ResidualBlockWithStride(nn.Module):
    """Halves the resolution; the shortcut is a strided 1x1 conv."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride=2)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.downsample = conv1x1(in_ch, out_ch, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        out = F.leaky_relu(self.conv1(x), 0.01)
        out = F.leaky_relu(self.conv2(out), 0.1)  # the second slope really is 0.1, before the sum
        return out + self.downsample(x)


class ResidualBlockUpsample(nn.Module):
    """Doubles the resolution with 1x1 conv + pixel shuffle on both paths."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.subpel_conv = subpel_conv1x1(in_ch, out_ch, 2)
        self.conv = conv3x3(out_ch, out_ch)
        self.upsample = subpel_conv1x1(in_ch, out_ch, 2)

    def forward(self, x: Tensor) -> Tensor:
        out = F.leaky_relu(self.subpel_conv(x), 0.01)
        out = F.leaky_relu(self.conv(out), 0.1)
        return out + self.upsample(x)


class ResidualBottleneck(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.branch = nn.Sequential(
            conv1x1(n, n // 2), nn.GELU(), conv3x3(n // 2, n // 2), nn.GELU(), conv1x1(n // 2, n)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


# ---------------------------------------------------------------------------------------------
# The four networks
# ---------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """g_a: y0 (latent of the VAE) -> y at half resolution. Only enc_mid[0] is ever used."""

    def __init__(self, cfg: LFGCMConfig):
        super().__init__()
        mid = cfg.enc_mid[0]
        self.g_a1 = nn.Sequential(
            ResidualBlockWithStride(cfg.in_nc, mid),
            ResidualBottleneck(mid),
            ResidualBottleneck(mid),
            ResidualBottleneck(mid),
        )
        self.g_a6 = conv3x3(mid, cfg.M)

    def forward(self, x: Tensor) -> Tensor:
        return self.g_a6(self.g_a1(x))


class HyperEncoder(nn.Module):
    """h_a: y -> z at 1/4 of y's resolution.

    The original class also holds SFT layers (h_a1, h_a4, h_a7, h_a8, sft_feature*) that its
    forward never calls; they are left out here and listed by `unused_key_shapes`.
    """

    def __init__(self, cfg: LFGCMConfig):
        super().__init__()
        self.h_a0 = conv3x3(cfg.M, cfg.N)
        self.h_a3 = conv(cfg.N, cfg.N)
        self.h_a6 = conv(cfg.N, cfg.N)
        self.h_a9 = conv1x1(cfg.N, cfg.N)

    def forward(self, y: Tensor) -> Tensor:
        x = F.gelu(self.h_a0(y))
        x = F.gelu(self.h_a3(x))
        return self.h_a9(self.h_a6(x))  # no activation between h_a6 and h_a9


class HyperDecoder(nn.Module):
    """h_s: z_hat -> hyper params (2M channels) at y's resolution."""

    def __init__(self, cfg: LFGCMConfig):
        super().__init__()
        n, m = cfg.N, cfg.M
        self.hyper_dec = nn.Sequential(
            deconv(n, m),
            nn.GELU(),
            deconv(m, m * 3 // 2),
            nn.GELU(),
            deconv(m * 3 // 2, m * 2, kernel_size=3, stride=1),
        )

    def forward(self, z_hat: Tensor) -> Tensor:
        return self.hyper_dec(z_hat)


class Decoder(nn.Module):
    """g_s: y_hat -> y_c, the control hint, at twice y's resolution."""

    def __init__(self, cfg: LFGCMConfig):
        super().__init__()
        n = cfg.N
        self.g_s2 = nn.Sequential(
            conv3x3(cfg.M, n), ResidualBottleneck(n), ResidualBottleneck(n), ResidualBottleneck(n)
        )
        self.g_s3 = nn.Sequential(
            ResidualBlockUpsample(n, n), ResidualBottleneck(n), ResidualBottleneck(n), ResidualBottleneck(n)
        )
        self.g_s4 = conv3x3(n, cfg.out_nc)

    def forward(self, y_hat: Tensor) -> Tensor:
        return self.g_s4(self.g_s3(self.g_s2(y_hat)))


class ChannelContext(nn.Module):
    """Context from the slices already decoded: three 5x5 convs (224 and 128 are hard-coded)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        # "fushion" is the checkpoint's spelling
        self.fushion = nn.Sequential(
            nn.Conv2d(in_ch, 224, 5, padding=2),
            nn.GELU(),
            nn.Conv2d(224, 128, 5, padding=2),
            nn.GELU(),
            nn.Conv2d(128, out_ch, 5, padding=2),
        )

    def forward(self, y_hat_prev: Tensor) -> Tensor:
        return self.fushion(y_hat_prev)


class ParameterHead(nn.Module):
    """Three 1x1 convs -> 2*C_k channels: scales (first half), then means."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.fusion = nn.Sequential(
            nn.Conv2d(in_ch, out_ch * 5 // 3, 1),
            nn.GELU(),
            nn.Conv2d(out_ch * 5 // 3, out_ch * 4 // 3, 1),
            nn.GELU(),
            nn.Conv2d(out_ch * 4 // 3, out_ch, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.fusion(x)


# ---------------------------------------------------------------------------------------------
# Stage modules
# ---------------------------------------------------------------------------------------------


class Analysis(nn.Module):
    """Stage "analysis": y = g_a(y0), z = h_a(y)."""

    def __init__(self, cfg: LFGCMConfig):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.hyper_enc = HyperEncoder(cfg)

    def forward(self, y0: Tensor) -> tuple[Tensor, Tensor]:
        y = self.encoder(y0)
        return y, self.hyper_enc(y)


class HyperSynthesis(nn.Module):
    """Stage "hyper_synthesis": hyper params = h_s(z_hat)."""

    def __init__(self, cfg: LFGCMConfig):
        super().__init__()
        self.hyper_dec = HyperDecoder(cfg)

    def forward(self, z_hat: Tensor) -> Tensor:
        return self.hyper_dec(z_hat)


class EntropyParameters(nn.Module):
    """Stage "entropy_parameters": the scales and means of every slice and checkerboard half.

    Both methods return parameters in the squeezed layout of the half they are for. The 1x1
    heads run on the squeezed inputs: they are pointwise, so this equals the original's
    full-resolution evaluation followed by squeezing, at half the cost. The 5x5 context convs
    need the full layout.
    """

    def __init__(self, cfg: LFGCMConfig):
        super().__init__()
        ch, two_m = cfg.slice_ch, 2 * cfg.M
        self.local_context = nn.ModuleList(nn.Conv2d(c, 2 * c, 5, padding=2) for c in ch)
        # slice 0 has no channel context; keyed by slice number, as the checkpoint (1..S-1)
        self.channel_context = nn.ModuleDict(
            {str(k): ChannelContext(sum(ch[:k]), 2 * ch[k]) for k in range(1, len(ch))}
        )
        self.entropy_parameters_anchor = nn.ModuleList(
            ParameterHead(two_m + (2 * c if k else 0), 2 * c) for k, c in enumerate(ch)
        )
        self.entropy_parameters_nonanchor = nn.ModuleList(
            ParameterHead(two_m + (4 * c if k else 2 * c), 2 * c) for k, c in enumerate(ch)
        )

    def anchor(
        self, k: int, hyper_params: Tensor, y_hat_prev: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(scales, means) of slice k at its anchors, squeezed, and the channel context
        (full layout; None for k = 0) for `nonanchor`. y_hat_prev: decoded slices 0..k-1."""
        if k == 0:
            channel_ctx, x = None, hyper_params
        else:
            assert y_hat_prev is not None, "slices after the first need the decoded earlier slices"
            channel_ctx = self.channel_context[str(k)](y_hat_prev)
            x = torch.cat([channel_ctx, hyper_params], dim=1)
        scales, means = self.entropy_parameters_anchor[k](squeeze_anchor(x)).chunk(2, dim=1)
        return scales, means, channel_ctx

    def nonanchor(
        self, k: int, anchor_hat: Tensor, hyper_params: Tensor, channel_ctx: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """(scales, means) of slice k at its non-anchors, squeezed. anchor_hat: the slice's
        decoded anchors in the full layout, zeros at the non-anchor positions."""
        local_ctx = self.local_context[k](anchor_hat)
        if k == 0:
            x = torch.cat([local_ctx, hyper_params], dim=1)
        else:
            assert channel_ctx is not None, "slices after the first need the channel context from anchor()"
            x = torch.cat([local_ctx, channel_ctx, hyper_params], dim=1)
        scales, means = self.entropy_parameters_nonanchor[k](squeeze_nonanchor(x)).chunk(2, dim=1)
        return scales, means


class Synthesis(nn.Module):
    """Stage "synthesis" (G_s): y_c = g_s(y_hat), the control hint."""

    def __init__(self, cfg: LFGCMConfig):
        super().__init__()
        self.decoder = Decoder(cfg)

    def forward(self, y_hat: Tensor) -> Tensor:
        return self.decoder(y_hat)


# ---------------------------------------------------------------------------------------------
# Checkpoint parts that no stage computes with
# ---------------------------------------------------------------------------------------------


def unused_key_shapes(cfg: LFGCMConfig) -> dict[str, tuple[int, ...]]:
    """Keys (without "preprocess_model.") and shapes of the LFGCM layers that are stored in
    checkpoints but never called: the HyperEncoder's SFT branch and LFGCM.f_c."""
    n, m, p, ks = cfg.N, cfg.M, cfg.prior_nc, cfg.sft_ks
    hidden = 128  # SFT's hidden width is a constant of the original layer class
    out: dict[str, tuple[int, ...]] = {}

    def add_conv(name: str, c_out: int, c_in: int, k: int) -> None:
        out[name + ".weight"] = (c_out, c_in, k, k)
        out[name + ".bias"] = (c_out,)

    def add_deconv(name: str, c_in: int, c_out: int, k: int) -> None:
        out[name + ".weight"] = (c_in, c_out, k, k)
        out[name + ".bias"] = (c_out,)

    def add_sft(name: str) -> None:
        add_conv(name + ".mlp_shared.0", hidden, p, ks)
        add_conv(name + ".mlp_gamma", n, hidden, ks)
        add_conv(name + ".mlp_beta", n, hidden, ks)

    h = "hyper_enc."
    add_conv(h + "sft_feature.0", p, 4, 3)  # the original hard-codes 4 input channels here
    add_conv(h + "sft_feature.2", p, p, 1)
    add_conv(h + "sft_feature_h1.0", 4 * p, m + p, 3)
    add_conv(h + "sft_feature_h1.2", 2 * p, 4 * p, 3)
    add_conv(h + "sft_feature_h1.4", p, 2 * p, 3)
    for name in ("sft_feature_h2", "sft_feature_h3"):
        add_conv(h + name + ".0", p, p, 3)
        add_conv(h + name + ".2", p, p, 1)
    add_sft(h + "h_a1")
    add_sft(h + "h_a4")
    for name in ("h_a7", "h_a8"):
        add_conv(h + name + ".conv_0", n, n, 3)
        add_conv(h + name + ".conv_1", n, n, 3)
        add_sft(h + name + ".norm_0")
        add_sft(h + name + ".norm_1")
    add_deconv("f_c.0", n, n // 2, 5)
    add_deconv("f_c.2", n // 2, n // 4, 5)
    add_deconv("f_c.4", n // 4, n // 4, 3)
    return out
