"""The SD 2.1 UNet, OSDiff's control module (CDDM) and the one-step denoiser stage.

    y_c (control hint), x_T (noise)
      control encoder: concat(x_T, y_c) -> narrow copy of the UNet encoder + middle block
      base UNet on x_T; after every encoder block, after the middle block and before every
        decoder block it receives a 1x1 "zero conv" of a control activation
      eps (noise prediction at t = 999, empty-prompt text context)
    y_r = x_T / sqrt(abar) - sqrt(1/abar - 1) * eps                       (paper eq. 8)

Module and attribute names are those of the original ldm `openaimodel.py` / `attention.py`
and OSDiff's `model/osdiff.py`, so state_dict keys are the checkpoint's under a fixed prefix:
`unet.` <-> `model.diffusion_model.`, `control.` <-> `control_model.` (export/checkpoint.py).
Inference only: no dropout (an nn.Identity keeps its slot where a key index depends on it), no
gradient checkpointing, and only the options the SD 2.1 / OSDiff configs use (linear
SpatialTransformer, conv resampling, no scale-shift norm, no class labels).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from osdiff.config import ControlConfig, DiffusionConfig, GuidanceConfig, UNetConfig
from osdiff.export.models.attention import attention


def find_denominator(n: int, start: int) -> int:
    """n itself if start >= n, else the largest divisor of n that is <= start.

    The original uses it for the control module's GroupNorm groups and head sizes, whose widths
    (0.2x the UNet's) need not be multiples of 32 or of the head size. For every width of the
    base UNet it returns 32 (groups) and num_head_channels (head size): SD's GroupNorm(32, C)
    and its head split only work when those divide C.
    """
    if start >= n:
        return n
    while n % start:
        start -= 1
    return start


def timestep_embedding(timesteps: Tensor, dim: int, max_period: int = 10000) -> Tensor:
    """Sinusoidal embedding, N -> N x dim: cosines first, then sines (ldm's layout)."""
    half = dim // 2
    # same float32 operation order as ldm, so the 999-radian arguments round identically
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the activation dtype, as the original's
    GroupNorm32 / GroupNorm_leq32 do: in fp16, statistics over 64x96 positions lose precision.
    Used for the transformer norms too (plain GroupNorm in the original; same result in fp32)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float()
        b = self.bias.float()
        # torch.group_norm, not F.group_norm: the latter refuses groups of one value, which the
        # narrow control module meets at the deepest level of small images (a 64x64 image's
        # 1x1 bottleneck with one channel per group); the result there is simply the bias.
        return torch.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def resblock_norm(channels: int) -> GroupNorm32:
    # base: GroupNorm(32, C); control: GroupNorm_leq32(find_denominator(C, 32), C). Same rule.
    return GroupNorm32(find_denominator(channels, 32), channels, eps=1e-5)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """norm, SiLU, 3x3 conv, + timestep embedding, norm, SiLU, 3x3 conv, + skip (1x1 conv when
    the width changes)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            resblock_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            resblock_norm(out_channels),
            nn.SiLU(),
            nn.Identity(),  # the dropout's slot: keeps the conv at key out_layers.3
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention of x to context (to x itself when context is None). Channels split
    head-major (heads x head size); scale head_size^-0.5; q/k/v without bias."""

    def __init__(self, query_dim: int, heads: int, head_size: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_size
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))  # [1] was dropout

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        # memory linear in the positions whatever their number (export/models/attention.py)
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)  # value first, gate second
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # [1] was dropout; the output projection stays at key net.2
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm: self-attention, cross-attention to the text, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_size: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, head_size)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, head_size, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """SD 2.x's linear variant: GroupNorm, Linear proj_in over (h w) tokens, transformer
    block(s), Linear proj_out, residual to the block input."""

    def __init__(self, channels: int, heads: int, head_size: int, context_dim: int, depth: int = 1):
        super().__init__()
        inner = heads * head_size
        if inner != channels:
            raise ValueError(f"{heads} heads of {head_size} do not cover {channels} channels")
        self.norm = GroupNorm32(find_denominator(channels, 32), channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_size, context_dim) for _ in range(depth)
        )
        # declared Linear(channels, inner) in the original although it maps inner -> channels;
        # the two are equal, and this keeps the checkpoint's weight shape by construction
        self.proj_out = nn.Linear(channels, inner)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # B x (H W) x C
        for block in self.transformer_blocks:
            h = block(h, context)
        # x first: a sum takes the memory format of its first operand, and the transposed
        # projection is a channels_last view. With it first, channels_last leaked out of every
        # transformer into the following convolutions, which then reordered their weights on
        # every call (28 % of the stage on the CPU). x's format is kept: contiguous, or
        # channels_last where the backend asks for it.
        return x + self.proj_out(h).transpose(1, 2).reshape(x.shape)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """One UNet block: hands the timestep embedding to ResBlocks and the context to
    transformers."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


# ---------------------------------------------------------------------------------------------
# Encoder (shared by the UNet, the control module and the discriminator), UNet, control module
# ---------------------------------------------------------------------------------------------


def skip_channels(width: int, cfg: UNetConfig) -> list[int]:
    """Output width of every encoder block: the stem conv, the res blocks, the downsamplers."""
    chans = [width]
    for level, mult in enumerate(cfg.channel_mult):
        chans += [mult * width] * cfg.num_res_blocks
        if level != len(cfg.channel_mult) - 1:
            chans.append(mult * width)
    return chans


def build_encoder(
    cfg: UNetConfig, in_channels: int, width: int, emb_channels: int, num_head_channels: int
) -> tuple[nn.ModuleList, TimestepEmbedSequential]:
    """input_blocks and middle_block of a UNet of base width `width`.

    Head size at each attention level: find_denominator(C, num_head_channels). The middle block
    reuses the head size of the last attention level, as the original control module does
    (for the base UNet this is num_head_channels either way).
    """

    def transformer(ch: int, head_size: int) -> SpatialTransformer:
        return SpatialTransformer(ch, ch // head_size, head_size, cfg.context_dim, cfg.transformer_depth)

    blocks = [TimestepEmbedSequential(nn.Conv2d(in_channels, width, 3, padding=1))]
    ch, ds, head_size = width, 1, num_head_channels
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, emb_channels, mult * width)]
            ch = mult * width
            if ds in cfg.attention_resolutions:
                head_size = find_denominator(ch, num_head_channels)
                layers.append(transformer(ch, head_size))
            blocks.append(TimestepEmbedSequential(*layers))
        if level != len(cfg.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            ds *= 2
    middle = TimestepEmbedSequential(
        ResBlock(ch, emb_channels), transformer(ch, head_size), ResBlock(ch, emb_channels)
    )
    return nn.ModuleList(blocks), middle


class UNet(nn.Module):
    """The SD 2.1 UNet (eps prediction). With decoder=False it is encoder + middle block only
    (ldm's UNetModel_Bottleneck, the shape of OSDiff's training-only discriminator), and
    forward returns the middle block's output."""

    def __init__(self, cfg: UNetConfig, decoder: bool = True):
        super().__init__()
        self.model_channels = mc = cfg.model_channels
        emb = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks, self.middle_block = build_encoder(cfg, cfg.in_channels, mc, emb, cfg.num_head_channels)
        self.decoder = decoder
        if not decoder:
            return

        skips = skip_channels(mc, cfg)
        ch, ds = skips[-1], 2 ** (len(cfg.channel_mult) - 1)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers: list[nn.Module] = [ResBlock(ch + skips.pop(), emb, mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    hs = cfg.num_head_channels
                    layers.append(SpatialTransformer(ch, ch // hs, hs, cfg.context_dim, cfg.transformer_depth))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(resblock_norm(ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor) -> Tensor:
        """Plain UNet, no control. timesteps: N or 1 values (1 broadcasts over the batch)."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        if not self.decoder:
            return h
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)


class ControlModule(nn.Module):
    """OSDiff's control encoder: the UNet encoder + middle block at int(ratio x) the width, fed
    concat(x, hint). Its time_embed keeps the base UNet's widths; its GroupNorms and head sizes
    follow find_denominator because its widths are not multiples of 32 / the head size."""

    def __init__(self, cfg: UNetConfig, control: ControlConfig):
        super().__init__()
        mc = cfg.model_channels
        emb = 4 * mc
        self.model_channels = int(mc * control.ratio)
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks, self.middle_block = build_encoder(
            cfg, cfg.in_channels + control.hint_channels, self.model_channels, emb, control.num_head_channels
        )


def zero_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    # a Sequential of one, as the original's TimestepEmbedSequential wrapper: keys "<i>.0.*"
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1))


class CDDM(nn.Module):
    """The control side's parameters: the control encoder and the 1x1 convs that inject its
    activations into the base UNet (zero-initialised in training, hence the names), with one
    scale each (`scale_list`: 12 encoder, 1 middle, 12 decoder at full size). The interleaved
    forward pass with the base UNet is Denoiser.eps."""

    scale_list: Tensor

    def __init__(self, cfg: UNetConfig, control: ControlConfig):
        super().__init__()
        self.control_model = ControlModule(cfg, control)
        ctrl = skip_channels(self.control_model.model_channels, cfg)
        base = skip_channels(cfg.model_channels, cfg)
        mid = base[-1]
        # base width entering each decoder block: the middle block's, then each block's output
        dec_in = [mid] + [cfg.model_channels * m for m in reversed(cfg.channel_mult)
                          for _ in range(cfg.num_res_blocks + 1)][:-1]
        self.enc_zero_convs_out = nn.ModuleList(zero_conv(c, b) for c, b in zip(ctrl, base))
        self.middle_block_out = zero_conv(ctrl[-1], mid)
        # decoder block j gets the control encoder's outputs in reverse order
        self.dec_zero_convs_out = nn.ModuleList(zero_conv(c, b) for c, b in zip(reversed(ctrl), dec_in))
        n = len(ctrl)
        self.register_buffer("scale_list", torch.full((2 * n + 1,), float(control.scale)))


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def one_step_coefficients(d: DiffusionConfig) -> tuple[float, float]:
    """float32 (sqrt(1/abar), sqrt(1/abar - 1)) at d.timestep, from the float64 linear schedule
    (what the original SpacedSampler recomputes; the float32 schedule buffers of a checkpoint
    give a c1 one ulp off)."""
    # explicit CPU: stages are often built under `with torch.device("meta")`
    betas = torch.linspace(d.linear_start**0.5, d.linear_end**0.5, d.timesteps, dtype=torch.float64, device="cpu") ** 2
    abar = float(torch.cumprod(1.0 - betas, dim=0)[d.timestep])
    return float(np.float32(math.sqrt(1.0 / abar))), float(np.float32(math.sqrt(1.0 / abar - 1.0)))


class Denoiser(nn.Module):
    """Stage "denoiser": (y_c, x_T) -> y_r, one eps-prediction step of the controlled UNet at
    t = d.timestep with the constant empty-prompt context, folded into paper eq. 8."""

    context: Tensor

    def __init__(self, unet: UNetConfig, control: ControlConfig, diffusion: DiffusionConfig,
                 context_length: int = 77):
        super().__init__()
        self.unet = UNet(unet)
        self.control = CDDM(unet, control)
        # the text encoder's output for "", computed once by the loader (not in checkpoints)
        self.register_buffer("context", torch.zeros(1, context_length, unet.context_dim), persistent=False)
        self.timestep = diffusion.timestep
        self.c1, self.c2 = one_step_coefficients(diffusion)

    def eps(self, x: Tensor, hint: Tensor, timesteps: Tensor, context: Tensor) -> Tensor:
        """The original CDDM.forward: base UNet + control encoder, interleaved. timesteps: N or
        1 values (1 broadcasts over the batch)."""
        unet, ctrl, cddm = self.unet, self.control.control_model, self.control
        scales = cddm.scale_list
        t_emb = timestep_embedding(timesteps, unet.model_channels).to(x.dtype)
        emb, emb_ctrl = unet.time_embed(t_emb), ctrl.time_embed(t_emb)

        h, h_ctrl = x, torch.cat([x, hint], dim=1)
        skips, ctrl_outs = [], []
        for i, (block, block_ctrl) in enumerate(zip(unet.input_blocks, ctrl.input_blocks)):
            h = block(h, emb, context)
            h_ctrl = block_ctrl(h_ctrl, emb_ctrl, context)
            h = h + cddm.enc_zero_convs_out[i](h_ctrl) * scales[i]
            skips.append(h)  # the skip is taken after the control addition
            ctrl_outs.append(h_ctrl)

        n = len(skips)
        h = unet.middle_block(h, emb, context)
        h_ctrl = ctrl.middle_block(h_ctrl, emb_ctrl, context)
        h = h + cddm.middle_block_out(h_ctrl) * scales[n]

        for j, block in enumerate(unet.output_blocks):
            h = h + cddm.dec_zero_convs_out[j](ctrl_outs.pop()) * scales[n + 1 + j]
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return unet.out(h)

    def forward(self, y_c: Tensor, x_T: Tensor) -> Tensor:
        # one timestep for the whole batch: the time embedding is computed once and broadcast
        t = torch.full((1,), self.timestep, dtype=torch.long, device=x_T.device)
        eps = self.eps(x_T, y_c, t, self.context.expand(x_T.shape[0], -1, -1))
        # float32 here: y_r is a difference of two terms ~15x its size
        return (self.c1 * x_T.float() - self.c2 * eps.float()).to(x_T.dtype)


def discriminator_key_shapes(cfg: GuidanceConfig) -> dict[str, tuple[int, ...]]:
    """Keys (without "guidance_model.Discriminator.") and shapes of the training-only
    discriminator stored in OSDiff checkpoints: a UNet encoder + middle block."""
    with torch.device("meta"):
        model = UNet(cfg.unet, decoder=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
