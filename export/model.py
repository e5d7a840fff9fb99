"""The OSDiff model as a set of stages: built from a config, loaded from checkpoints, or given
seeded random weights, and split into the graphs that get exported and run.

Load units (one nn.Module each, state_dict keys = checkpoint keys under a prefix, see
export/checkpoint.py): vae_encoder, analysis, hyper_synthesis, entropy_parameters, synthesis,
denoiser, vae_decoder, and text_encoder, which runs once at load time to produce the
empty-prompt context and is then dropped.

Graphs (what a backend runs, what becomes one ONNX file / TensorRT engine):

    encode: image -vae_encoder-> y0 -analysis-> (y, z)      z -> EntropyBottleneck -> z_hat
            z_hat -hyper_synthesis-> hyper_params
            per slice k: entropy_anchor_k, entropy_nonanchor_k  -> (scales, means)
    decode: the same z/hyper/slice path, then y_hat -synthesis-> y_c
            (y_c, x_T) -denoiser-> y_r -vae_decoder-> image
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from osdiff.config import ModelConfig
from osdiff.export.checkpoint import CheckpointError, read_checkpoints, split_by_stage
from osdiff.export.models.lfgcm import Analysis, EntropyParameters, HyperSynthesis, Synthesis
from osdiff.export.models.text import TextEncoder, empty_prompt_tokens
from osdiff.export.models.unet import Denoiser
from osdiff.export.models.vae import VAEDecoder, VAEEncoder
from osdiff.runtime.backends.base import EntropyModels
from osdiff.runtime.entropy import EntropyBottleneck, GaussianConditional

# load units that stay after loading (text_encoder does not)
STAGES = ("vae_encoder", "analysis", "hyper_synthesis", "entropy_parameters", "synthesis", "denoiser", "vae_decoder")


def build_stages(cfg: ModelConfig, with_text: bool = True) -> dict[str, nn.Module]:
    stages: dict[str, nn.Module] = {
        "vae_encoder": VAEEncoder(cfg.vae, cfg.diffusion.scale_factor),
        "analysis": Analysis(cfg.lfgcm),
        "hyper_synthesis": HyperSynthesis(cfg.lfgcm),
        "entropy_parameters": EntropyParameters(cfg.lfgcm),
        "synthesis": Synthesis(cfg.lfgcm),
        "denoiser": Denoiser(cfg.unet, cfg.control, cfg.diffusion, cfg.text.context_length),
        "vae_decoder": VAEDecoder(cfg.vae, cfg.diffusion.scale_factor),
    }
    if with_text:
        stages["text_encoder"] = TextEncoder(cfg.text)
    return stages


# ---------------------------------------------------------------------------------------------
# Graphs: the runnable units, with named inputs and outputs
# ---------------------------------------------------------------------------------------------


class _Anchor(nn.Module):
    def __init__(self, ep: EntropyParameters, k: int):
        super().__init__()
        self.ep, self.k = ep, k

    def forward(self, hyper_params: Tensor, y_hat_prev: Tensor | None = None) -> tuple[Tensor, ...]:
        scales, means, channel_ctx = self.ep.anchor(self.k, hyper_params, y_hat_prev)
        return (scales, means) if channel_ctx is None else (scales, means, channel_ctx)


class _NonAnchor(nn.Module):
    def __init__(self, ep: EntropyParameters, k: int):
        super().__init__()
        self.ep, self.k = ep, k

    def forward(self, anchor_hat: Tensor, hyper_params: Tensor, channel_ctx: Tensor | None = None) -> tuple[Tensor, ...]:
        return self.ep.nonanchor(self.k, anchor_hat, hyper_params, channel_ctx)


@dataclass(frozen=True)
class Graph:
    name: str
    module: nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def graphs(cfg: ModelConfig, stages: dict[str, nn.Module]) -> dict[str, Graph]:
    """Every runnable graph, in pipeline order."""
    out = [
        Graph("vae_encoder", stages["vae_encoder"], ("image",), ("y0",)),
        Graph("analysis", stages["analysis"], ("y0",), ("y", "z")),
        Graph("hyper_synthesis", stages["hyper_synthesis"], ("z_hat",), ("hyper_params",)),
    ]
    ep = stages["entropy_parameters"]
    assert isinstance(ep, EntropyParameters)
    for k in range(len(cfg.lfgcm.slice_ch)):
        first = k == 0
        out.append(Graph(f"entropy_anchor_{k}", _Anchor(ep, k),
                         ("hyper_params",) if first else ("hyper_params", "y_hat_prev"),
                         ("scales", "means") if first else ("scales", "means", "channel_ctx")))
        out.append(Graph(f"entropy_nonanchor_{k}", _NonAnchor(ep, k),
                         ("anchor_hat", "hyper_params") if first else ("anchor_hat", "hyper_params", "channel_ctx"),
                         ("scales", "means")))
    out += [
        Graph("synthesis", stages["synthesis"], ("y_hat",), ("y_c",)),
        Graph("denoiser", stages["denoiser"], ("y_c", "x_T"), ("y_r",)),
        Graph("vae_decoder", stages["vae_decoder"], ("y_r",), ("image",)),
    ]
    return {g.name: g for g in out}


def graph_shapes(cfg: ModelConfig, name: str, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
    """Shape of every input and output of graph `name` for a padded batch x 3 x height x width."""
    f = cfg.latent_downsample
    if height % cfg.pad_multiple or width % cfg.pad_multiple:
        raise ValueError(f"height and width must be multiples of {cfg.pad_multiple}")
    b, m, n, ch = batch, cfg.lfgcm.M, cfg.lfgcm.N, cfg.lfgcm.slice_ch
    lat = (b, cfg.vae.embed_dim, height // f, width // f)
    yh, yw = height // (2 * f), width // (2 * f)
    common = {
        "image": (b, 3, height, width), "y0": lat, "y_c": lat, "x_T": lat, "y_r": lat,
        "y": (b, m, yh, yw), "y_hat": (b, m, yh, yw), "z": (b, n, yh // 4, yw // 4),
        "z_hat": (b, n, yh // 4, yw // 4), "hyper_params": (b, 2 * m, yh, yw),
    }
    if name.startswith("entropy_"):
        k = int(name.rsplit("_", 1)[1])
        common.update({
            "y_hat_prev": (b, sum(ch[:k]), yh, yw), "channel_ctx": (b, 2 * ch[k], yh, yw),
            "anchor_hat": (b, ch[k], yh, yw), "scales": (b, ch[k], yh, yw // 2), "means": (b, ch[k], yh, yw // 2),
        })
    with torch.device("meta"):
        g = graphs(cfg, build_stages(cfg, with_text=False))[name]
    return {io: common[io] for io in g.inputs + g.outputs}


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@dataclass
class OSDiffModel:
    config: ModelConfig
    stages: dict[str, nn.Module]
    entropy_bottleneck: EntropyBottleneck
    gaussian: GaussianConditional
    weights_id: bytes  # SHA-256 of the stored weights (see weights_digest)

    @property
    def context(self) -> Tensor:
        return self.stages["denoiser"].context

    @property
    def entropy_models(self) -> EntropyModels:
        """What a backend carries besides the graphs, with the model's identity."""
        return EntropyModels(self.config, self.entropy_bottleneck, self.gaussian, self.weights_id)

    @property
    def fingerprint(self) -> bytes:
        """The model identity (weights and entropy tables) that export and engine manifests carry."""
        return self.entropy_models.fingerprint

    def graphs(self) -> dict[str, Graph]:
        return graphs(self.config, self.stages)

    @staticmethod
    def load(sd: str | Path | None, osdiff: str | Path | None, config: ModelConfig | None = None) -> "OSDiffModel":
        """From the SD 2.1 checkpoint and the OSDiff checkpoint (or one combined file)."""
        return OSDiffModel.from_state_dict(read_checkpoints(sd, osdiff), config or ModelConfig.full())

    @staticmethod
    def from_state_dict(state_dict: dict[str, Tensor], cfg: ModelConfig) -> "OSDiffModel":
        parts = split_by_stage(state_dict, cfg)
        weights_id = weights_digest({f"{stage}.{key}": t for stage, part in parts.items() for key, t in part.items()})
        with torch.device("meta"):
            stages = build_stages(cfg)
        for name, module in stages.items():
            module.to_empty(device="cpu")
            module.load_state_dict({k: v.float() for k, v in parts[name].items()}, strict=True)
            module.eval().requires_grad_(False)
        _check_no_stray_buffers(stages)
        text = stages.pop("text_encoder")
        with torch.no_grad():
            stages["denoiser"].context.copy_(text(empty_prompt_tokens(cfg.text.context_length)))
        try:
            eb = EntropyBottleneck({k: v.float() for k, v in parts["entropy_bottleneck"].items()}, cfg.entropy.precision)
        except ValueError as e:
            raise CheckpointError(f"the entropy bottleneck parameters are unusable: {e}") from e
        return OSDiffModel(cfg, stages, eb, GaussianConditional(cfg.entropy), weights_id)

    @staticmethod
    def random(cfg: ModelConfig, seed: int = 0) -> "OSDiffModel":
        """The real architecture with seeded random weights, scaled so that every stage has
        O(1) activations and the entropy model codes a realistic number of bits. Not a codec
        anyone should use: it exists for demos, tests and profiling without checkpoints."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            stages = build_stages(cfg, with_text=False)
            for module in stages.values():
                module.eval().requires_grad_(False)
            # The text tower is 354 M parameters at full size; with random weights its output
            # is no more meaningful than random numbers of the same scale.
            stages["denoiser"].context.copy_(torch.randn_like(stages["denoiser"].context))
            eb = EntropyBottleneck(_random_bottleneck(cfg.lfgcm.N), cfg.entropy.precision)
            model = OSDiffModel(cfg, stages, eb, GaussianConditional(cfg.entropy), b"")
            _calibrate(model)
        # the random context stands in for the text tower's weights
        named = {f"{name}.{key}": t for name, stage in model.stages.items() for key, t in stage.state_dict().items()}
        named["denoiser.context"] = model.context
        named |= {f"entropy_bottleneck.{key}": t for key, t in eb.params.items()}
        model.weights_id = weights_digest(named)
        return model


def _check_no_stray_buffers(stages: dict[str, nn.Module]) -> None:
    """Stages are built on the meta device and filled from the checkpoint, so a buffer that is
    not in the checkpoint would be left uninitialized. The context is the only one, and it is
    set right after."""
    for name, module in stages.items():
        stored = set(module.state_dict())
        for key, _ in module.named_buffers():
            if key not in stored and (name, key) != ("denoiser", "context"):
                raise AssertionError(f"{name}.{key} is a buffer that loading would leave uninitialized")


def _random_bottleneck(channels: int, init_scale: float = 1.0, support: float = 6.0,
                       filters: tuple[int, ...] = (3, 3, 3, 3)) -> dict[str, Tensor]:
    """compressai's EntropyBottleneck initialization, with a density about as wide as the
    calibrated z (compressai's default init_scale of 10 makes every z symbol cost ~5 bits)."""
    dims = (1, *filters, 1)
    scale = init_scale ** (1 / (len(filters) + 1))
    p: dict[str, Tensor] = {}
    for i in range(len(filters) + 1):
        p[f"matrices.{i}"] = torch.full((channels, dims[i + 1], dims[i]), float(np.log(np.expm1(1 / scale / dims[i + 1]))))
        p[f"biases.{i}"] = torch.rand(channels, dims[i + 1], 1) - 0.5
        if i < len(filters):
            p[f"factors.{i}"] = torch.zeros(channels, dims[i + 1], 1)
    p["quantiles"] = torch.tensor([-support, 0.0, support]).repeat(channels, 1, 1)
    return p


# Output scales of the random model: O(1) activations everywhere, and a latent y that codes at
# a low, realistic rate (a few hundredths of a bit per pixel), so that entropy coding is
# timed on streams of a plausible size.
_RANDOM_Y_STD = 0.2
_RANDOM_SCALE = 0.2


@torch.no_grad()
def _calibrate(model: OSDiffModel) -> None:
    """Rescale the last layer of each random stage, stage by stage on a random image."""
    s, cfg = model.stages, model.config
    m = cfg.pad_multiple
    x = torch.rand(1, 3, 2 * m, 3 * m)

    def rescale(conv: nn.Module, out: Tensor, std: float, rows: slice = slice(None), center: bool = False) -> None:
        w, b = conv.weight, conv.bias
        out_dim = 1 if isinstance(conv, nn.ConvTranspose2d) else 0
        k = std / float(out[:, rows].std().clamp_min(1e-12))
        w.narrow(out_dim, rows.start or 0, out[:, rows].shape[1]).mul_(k)
        b[rows] = (b[rows] - (out[:, rows].mean() if center else 0.0)) * k

    moments = s["vae_encoder"].moments(x)
    rescale(s["vae_encoder"].quant_conv, moments, 1.0 / cfg.diffusion.scale_factor, slice(0, cfg.vae.embed_dim))
    y0 = s["vae_encoder"](x)
    rescale(s["analysis"].encoder.g_a6, s["analysis"].encoder(y0), _RANDOM_Y_STD)
    y, z = s["analysis"](y0)
    rescale(s["analysis"].hyper_enc.h_a9, z, 0.6)
    z_hat = model.entropy_bottleneck.compress(s["analysis"](y0)[1])[1]
    rescale(s["hyper_synthesis"].hyper_dec.hyper_dec[4], s["hyper_synthesis"](z_hat), 1.0)
    ep = s["entropy_parameters"]
    assert isinstance(ep, EntropyParameters)
    for head in list(ep.entropy_parameters_anchor) + list(ep.entropy_parameters_nonanchor):
        last = head.fusion[4]
        c = last.out_channels // 2
        last.weight[:c].mul_(0.05)  # scales: about _RANDOM_SCALE, a little spread
        last.bias[:c] = _RANDOM_SCALE
        last.weight[c:].mul_(0.02)  # means: near 0, like y
        last.bias[c:] = 0.0
    y_hat = torch.round(y)
    rescale(s["synthesis"].decoder.g_s4, s["synthesis"](y_hat), 1.0)
    y_c = s["synthesis"](y_hat)
    x_T = torch.randn_like(y_c)
    den = s["denoiser"]
    t = torch.full((1,), den.timestep, dtype=torch.long)
    rescale(den.unet.out[2], den.eps(x_T, y_c, t, den.context), 1.0)
    y_r = den(y_c, x_T)
    rescale(s["vae_decoder"].decoder.conv_out, s["vae_decoder"].decode_raw(y_r), 0.6, center=True)


def weights_digest(weights: dict[str, Tensor]) -> bytes:
    """SHA-256 of a model's weights as stored, keyed by name and shape: the identity a stream
    carries, so that a decoder refuses streams of another model.

    Only stored values go in, converted exactly to float32 (an fp16 file and its fp32 twin are
    the same model), never a value computed at load time (the text tower's context, the entropy
    tables): those carry the last bits of the CPU's float kernels, and two machines would
    disagree about the identity of one checkpoint. Tensors over 65,536 values are hashed on a
    fixed stride, which tells any two trained checkpoints apart at a fraction of the cost of
    hashing 4 GB.
    """
    h = hashlib.sha256(b"osdiff-weights-v1")
    for key in sorted(weights):
        t = weights[key].detach().float().reshape(-1)
        if t.numel() > 65536:
            t = t[:: t.numel() // 65536]
        h.update(f"{key}:{tuple(weights[key].shape)}".encode())
        h.update(t.contiguous().numpy().astype("<f4").tobytes())
    return h.digest()
