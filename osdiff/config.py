"""Model configuration: every hyper-parameter the stages need, nothing else.

`ModelConfig.full()` is the published OSDiff model (configs/model/osdiff.yaml of the original
code plus the SD 2.1 and OpenCLIP ViT-H/14 sizes it pulls in). Any other configuration is
read from JSON in the layout of the reference golden sets (`reference/tiny/config.json`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration file is unreadable or inconsistent."""


@dataclass(frozen=True)
class UNetConfig:
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_head_channels: int = 64
    context_dim: int = 1024
    in_channels: int = 4
    out_channels: int = 4
    transformer_depth: int = 1


@dataclass(frozen=True)
class ControlConfig:
    """OSDiff's control module (CDDM): a narrow copy of the UNet encoder."""

    ratio: float = 0.2
    num_head_channels: int = 16
    hint_channels: int = 4
    scale: float = 1.0


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3
    # SD's (ldm's Normalize) 32. The demo VAE's 8: at 32 channels, 32 groups normalize each
    # channel alone and erase its mean over the image, which the decoder then has to guess from
    # the image's borders, differently at every size (issue 29)
    norm_groups: int = 32


@dataclass(frozen=True)
class TextConfig:
    """OpenCLIP text tower; only used once, to compute the empty-prompt context."""

    width: int = 1024
    layers: int = 24
    heads: int = 16
    vocab_size: int = 49408
    context_length: int = 77
    mlp_ratio: float = 4.0
    projection_dim: int = 1024


@dataclass(frozen=True)
class LFGCMConfig:
    in_nc: int = 4
    out_nc: int = 4
    enc_mid: tuple[int, ...] = (64, 128, 192, 192)
    N: int = 192
    M: int = 320
    prior_nc: int = 64
    sft_ks: int = 3
    slice_ch: tuple[int, ...] = (8, 8, 8, 8, 16, 16, 32, 32, 96, 96)

    @property
    def slice_ranges(self) -> list[tuple[int, int]]:
        out, start = [], 0
        for c in self.slice_ch:
            out.append((start, start + c))
            start += c
        return out


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timestep: int = 999
    scale_factor: float = 0.18215


@dataclass(frozen=True)
class EntropyConfig:
    scale_min: float = 0.11
    scale_max: float = 256.0
    scale_levels: int = 64
    tail_mass: float = 1e-9
    precision: int = 16


@dataclass(frozen=True)
class GuidanceConfig:
    """The training-only discriminator stored in OSDiff checkpoints (never executed).

    Its sizes are hard-coded in the original code; they are listed here only so that the
    loader can account for every key of a checkpoint.
    """

    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_head_channels: int = 64
    context_dim: int = 1024
    dmlp_channels: int = 1280

    @property
    def unet(self) -> UNetConfig:
        """The discriminator's UNet encoder + middle block (f_d), as a UNet config."""
        return UNetConfig(model_channels=self.model_channels, channel_mult=self.channel_mult,
                          num_res_blocks=self.num_res_blocks, attention_resolutions=self.attention_resolutions,
                          num_head_channels=self.num_head_channels, context_dim=self.context_dim)


@dataclass(frozen=True)
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    lfgcm: LFGCMConfig = field(default_factory=LFGCMConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    entropy: EntropyConfig = field(default_factory=EntropyConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    name: str = "osdiff-full"

    @staticmethod
    def full() -> "ModelConfig":
        return ModelConfig()

    @staticmethod
    def demo() -> "ModelConfig":
        """A small configuration of the same architecture (every block type and code path, two
        UNet levels, two slices) that runs in seconds on a CPU: the built-in model's
        (osdiff/assets/demo_model.safetensors, trained by `osdiff train --builtin`). Its VAE
        downsamples 4x, not 8x, so that a VAE this small still reconstructs photos well; its
        text tower is as narrow as the loader allows (the 49,408-token vocabulary stays), so
        that the weights ship in under 10 MB. Its UNet is 64 channels wide at both levels, not
        32 at the first: SD's GroupNorm(32, C) over 32 channels normalizes each channel alone,
        so the UNet's last norm erased every channel's mean over the image and the decoded
        latent's mean could not follow the image's (held-out photos came back with their colours
        pulled to grey; two channels per group let it through). Its VAE, 32 channels wide at the
        full-resolution levels, has 8 GroupNorm groups for the same reason (VAEConfig.norm_groups:
        with 32, after 600 steps on 64-px crops, it reconstructed four whole held-out photos at
        11-18 dB with their channel means off by 24-60 levels; with 8, 23-29 dB and 2-13 levels). Its one denoising step is at
        t = 200, not 999: y_r = (y_T - sqrt(1 - abar) eps) / sqrt(abar) from pure noise y_T
        leaves 1/sqrt(abar) of the UNet's relative error in cancelling y_T in y_r, 14.6 at
        t = 999 and 1.15 at t = 200, and a UNet trained from scratch on a CPU is not precise
        enough for the former."""
        return ModelConfig(
            unet=UNetConfig(model_channels=64, channel_mult=(1, 1), num_res_blocks=1,
                            attention_resolutions=(2,), num_head_channels=16, context_dim=8),
            control=ControlConfig(ratio=0.5, num_head_channels=4),
            vae=VAEConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, norm_groups=8),
            text=TextConfig(width=8, layers=2, heads=2, projection_dim=8),
            lfgcm=LFGCMConfig(enc_mid=(32, 32, 32, 32), N=32, M=64, prior_nc=16, slice_ch=(16, 48)),
            guidance=GuidanceConfig(model_channels=64, channel_mult=(1, 1), num_res_blocks=1,
                                    attention_resolutions=(2,), num_head_channels=16, context_dim=8,
                                    # 8 channels per group: the MLP's last GroupNorm(32, .) sees one position
                                    dmlp_channels=256),
            diffusion=DiffusionConfig(timestep=200),
            name="demo",
        )

    @staticmethod
    def named(name_or_path: str | Path | None) -> "ModelConfig":
        """"full" (the default), "demo", or a JSON file in the reference layout."""
        if name_or_path in (None, "full"):
            return ModelConfig.full()
        if name_or_path == "demo":
            return ModelConfig.demo()
        return ModelConfig.from_json(name_or_path)

    @staticmethod
    def from_json(path: str | Path) -> "ModelConfig":
        """Read a config in the layout of a reference golden set's config.json."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read model config {path}: {e}") from e
        try:
            return _from_reference_layout(raw, name=raw.get("set", path.stem))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"model config {path} is missing or has a bad field: {e!r}") from e

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "ModelConfig":
        """Inverse of to_dict (the layout export manifests store)."""
        parts: dict[str, Any] = {}
        for f in fields(ModelConfig):
            value = d[f.name]
            if isinstance(value, dict):
                sub = _SECTIONS[f.name]
                value = sub(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
            parts[f.name] = value
        return ModelConfig(**parts)

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent position of the VAE (8 for SD 2.1)."""
        return 2 ** (len(self.vae.ch_mult) - 1)

    @property
    def pad_multiple(self) -> int:
        """Image sides are padded to this: VAE x8, then G_a x2, h_a x4."""
        return self.latent_downsample * 8


_SECTIONS: dict[str, Any] = {
    "unet": UNetConfig, "control": ControlConfig, "vae": VAEConfig, "text": TextConfig, "lfgcm": LFGCMConfig,
    "diffusion": DiffusionConfig, "entropy": EntropyConfig, "guidance": GuidanceConfig,
}


def _tuple(v: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in v)


def _from_reference_layout(raw: dict[str, Any], name: str) -> ModelConfig:
    u, c, v, t, l = raw["unet"], raw["control"], raw["vae"], raw["text_encoder"], raw["lfgcm"]
    dd = v["ddconfig"]
    d = raw.get("diffusion", {})
    e = raw.get("entropy_coding", {})
    g = raw.get("guidance_model", {})
    gu = g.get("unet_bottleneck", {})
    cfg = ModelConfig(
        unet=UNetConfig(
            model_channels=int(u["model_channels"]),
            channel_mult=_tuple(u["channel_mult"]),
            num_res_blocks=int(u["num_res_blocks"]),
            attention_resolutions=_tuple(u["attention_resolutions"]),
            num_head_channels=int(u["num_head_channels"]),
            context_dim=int(u["context_dim"]),
            in_channels=int(u.get("in_channels", 4)),
            out_channels=int(u.get("out_channels", 4)),
            transformer_depth=int(u.get("transformer_depth", 1)),
        ),
        control=ControlConfig(
            ratio=float(c["control_model_ratio"]),
            num_head_channels=int(c["num_head_channels"]),
            hint_channels=int(c.get("hint_channels", 4)),
            scale=float(c.get("control_scale", 1.0)),
        ),
        vae=VAEConfig(
            ch=int(dd["ch"]),
            ch_mult=_tuple(dd["ch_mult"]),
            num_res_blocks=int(dd["num_res_blocks"]),
            z_channels=int(dd["z_channels"]),
            embed_dim=int(v["embed_dim"]),
            in_channels=int(dd.get("in_channels", 3)),
            out_ch=int(dd.get("out_ch", 3)),
        ),
        text=TextConfig(
            width=int(t["width"]),
            layers=int(t["layers"]),
            heads=int(t["heads"]),
            vocab_size=int(t.get("vocab_size", 49408)),
            context_length=int(t.get("context_length", 77)),
            mlp_ratio=float(t.get("mlp_ratio", 4.0)),
            projection_dim=int(t.get("text_projection_dim (unused)", t["width"])),
        ),
        lfgcm=LFGCMConfig(
            in_nc=int(l["in_nc"]),
            out_nc=int(l["out_nc"]),
            enc_mid=_tuple(l["enc_mid"]),
            N=int(l["N"]),
            M=int(l["M"]),
            prior_nc=int(l["prior_nc"]),
            sft_ks=int(l.get("sft_ks", 3)),
            slice_ch=_tuple(l["slice_ch"]),
        ),
        diffusion=DiffusionConfig(
            timesteps=int(d.get("timesteps", 1000)),
            linear_start=float(d.get("linear_start", 0.00085)),
            linear_end=float(d.get("linear_end", 0.012)),
            timestep=int(d.get("timestep", 999)),
            scale_factor=float(d.get("scale_factor", 0.18215)),
        ),
        entropy=EntropyConfig(
            scale_min=float(e.get("scale_bound", 0.11)),
            tail_mass=float(e.get("gaussian_tail_mass", 1e-9)),
            precision=int(e.get("cdf_precision_bits", 16)),
        ),
        guidance=GuidanceConfig(
            model_channels=int(gu.get("model_channels", 320)),
            channel_mult=_tuple(gu.get("channel_mult", (1, 2, 4, 4))),
            num_res_blocks=int(gu.get("num_res_blocks", 2)),
            attention_resolutions=_tuple(gu.get("attention_resolutions", (4, 2, 1))),
            num_head_channels=int(gu.get("num_head_channels", 64)),
            context_dim=int(u["context_dim"]) if gu else 1024,
            dmlp_channels=int(g.get("dmlp_channels", 1280)),
        ),
        name=name,
    )
    if sum(cfg.lfgcm.slice_ch) != cfg.lfgcm.M:
        raise ValueError(f"lfgcm.slice_ch sums to {sum(cfg.lfgcm.slice_ch)}, not M={cfg.lfgcm.M}")
    return cfg
