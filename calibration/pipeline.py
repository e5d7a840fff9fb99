"""The codec run on calibration images, in PyTorch on the CPU: the real inputs of every heavy
graph (what calibration sees), and decodes with some graphs replaced by quantized copies (what
the sensitivity analysis and the loss figures measure).

Each calibration image is compressed and decompressed with the fp32 model as `osdiff compress`
and `osdiff decompress` do (image i with noise seed i), recording the inputs of the heavy graphs:
the image for the VAE encoder, y_hat for G_s, (y_c, x_T) for the denoiser, y_r for the VAE
decoder. A quantized graph is then judged by the image the whole codec decodes with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from osdiff.calibration.images import CalibrationImage
from osdiff.calibration.precision import QUANTIZED_GRAPHS
from osdiff.export.model import OSDiffModel
from osdiff.files import psnr
from osdiff.runtime.backends.torch_backend import TorchBackend
from osdiff.runtime.codec import Codec, tensor_to_image

# graphs that run while compressing: replacing one of them changes the stream
ENCODE_GRAPHS = ("vae_encoder",)


class _Backend:
    """The fp32 torch backend, with some graphs run by other modules and the inputs of some
    graphs recorded."""

    def __init__(self, model: OSDiffModel, swaps: dict[str, nn.Module], record: tuple[str, ...] = ()) -> None:
        self.base = TorchBackend(model)
        self.name, self.models, self.device = self.base.name, self.base.models, self.base.device
        self.swaps = swaps
        self.recorded: dict[str, list[tuple[Tensor, ...]]] = {g: [] for g in record}

    def run(self, graph: str, *inputs: Tensor) -> tuple[Tensor, ...]:
        if graph in self.recorded:
            self.recorded[graph].append(tuple(x.clone() for x in inputs))
        module = self.swaps.get(graph)
        if module is None:
            return self.base.run(graph, *inputs)
        with torch.no_grad():
            out = module(*inputs)
        return out if isinstance(out, tuple) else (out,)


@dataclass
class CalibrationRun:
    """The fp32 codec on the calibration images."""

    images: list[CalibrationImage]
    streams: list[bytes]
    decoded: list[np.ndarray]  # fp32 decodes, H x W x 3 uint8
    inputs: dict[str, list[tuple[Tensor, ...]]] = field(default_factory=dict)  # graph -> one tuple per image

    @property
    def bytes(self) -> int:
        return sum(len(s) for s in self.streams)


def run_fp32(model: OSDiffModel, images: list[CalibrationImage]) -> CalibrationRun:
    backend = _Backend(model, {}, QUANTIZED_GRAPHS)
    codec = Codec(backend)
    streams, decoded = [], []
    with torch.no_grad():
        for i, im in enumerate(images):
            streams.append(codec.compress(im.pixels, seed=i))
            decoded.append(codec.decompress(streams[-1]))
    return CalibrationRun(images, streams, decoded, backend.recorded)


def decode_with(model: OSDiffModel, run: CalibrationRun, swaps: dict[str, nn.Module]) -> tuple[list[np.ndarray], int]:
    """The calibration images decoded with `swaps` (graph -> module) in place of the fp32
    graphs, and the stream bytes (which only an encoder-side swap changes). With the encoder
    swapped, the codec runs whole; otherwise the decode resumes from the fp32 run's recorded
    input of the first swapped graph, which is what the codec would compute up to there."""
    out = []
    total = 0
    if any(g in swaps for g in ENCODE_GRAPHS):
        codec = Codec(_Backend(model, swaps))
        with torch.no_grad():
            for i, im in enumerate(run.images):
                data = codec.compress(im.pixels, seed=i)
                total += len(data)
                out.append(codec.decompress(data))
        return out, total
    graphs = model.graphs()
    synthesis, denoiser, vae_decoder = (swaps.get(g, graphs[g].module) for g in ("synthesis", "denoiser", "vae_decoder"))
    with torch.no_grad():
        for i, im in enumerate(run.images):
            (y_hat,), (y_c, x_T), (y_r,) = (run.inputs[g][i] for g in ("synthesis", "denoiser", "vae_decoder"))
            if "synthesis" in swaps:
                y_c = synthesis(y_hat)
            if "synthesis" in swaps or "denoiser" in swaps:
                y_r = denoiser(y_c, x_T)
            h, w = im.pixels.shape[:2]
            out.append(tensor_to_image(vae_decoder(y_r)[:, :, :h, :w]))
    return out, run.bytes


def quality(decoded: list[np.ndarray], reference: list[np.ndarray], originals: list[np.ndarray]) -> dict[str, float]:
    """Mean over images: PSNR (dB) and MS-SSIM of `decoded` against `reference` (the fp32
    decodes) and against the originals, and the drops (reference's against the originals minus
    decoded's). MS-SSIM (pytorch-msssim) only where installed and every image is over 160
    pixels on its shorter side (its five scales need that)."""
    out = {
        "psnr_vs_fp32_db": float(np.mean([min(psnr(d, r), 99.0) for d, r in zip(decoded, reference)])),
        "psnr_db": float(np.mean([psnr(d, o) for d, o in zip(decoded, originals)])),
        "psnr_fp32_db": float(np.mean([psnr(r, o) for r, o in zip(reference, originals)])),
    }
    out["psnr_drop_db"] = out["psnr_fp32_db"] - out["psnr_db"]
    msssim = _ms_ssim()
    if msssim is not None and min(min(d.shape[:2]) for d in decoded) > 160:
        out["ms_ssim_vs_fp32"] = float(np.mean([msssim(d, r) for d, r in zip(decoded, reference)]))
        out["ms_ssim"] = float(np.mean([msssim(d, o) for d, o in zip(decoded, originals)]))
        out["ms_ssim_fp32"] = float(np.mean([msssim(r, o) for r, o in zip(reference, originals)]))
        out["ms_ssim_drop"] = out["ms_ssim_fp32"] - out["ms_ssim"]
    return out


def _ms_ssim():  # type: ignore[no-untyped-def]
    try:
        from pytorch_msssim import ms_ssim
    except ImportError:
        return None

    def f(a: np.ndarray, b: np.ndarray) -> float:
        ta, tb = (torch.from_numpy(x.astype(np.float64)).permute(2, 0, 1)[None] for x in (a, b))  # a copy: inputs may be read-only
        return float(ms_ssim(ta, tb, data_range=255, size_average=True))
    return f


class Recorded(nn.Module):
    """`module`, keeping its output of every call (what latent_error compares)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.outputs: list[Tensor] = []

    def forward(self, *args: Tensor) -> Tensor:
        out = self.module(*args)
        self.outputs.append(out)
        return out


def latent_error(outputs: list[Tensor], reference: nn.Module, inputs: list[tuple[Tensor, ...]]) -> dict[str, float]:
    """Max and mean |quantized - fp32| of a graph's output on its calibration inputs (`outputs`:
    the quantized graph's, one per input tuple, as a Recorded copy run by decode_with keeps
    them), and the fp32 output's RMS for scale."""
    if len(outputs) != len(inputs):
        raise ValueError(f"{len(outputs)} outputs for {len(inputs)} inputs")
    errs, rms = [], []
    with torch.no_grad():
        for a, args in zip(outputs, inputs):
            b = reference(*args)
            errs.append((a - b).abs().flatten())
            rms.append(float(b.pow(2).mean().sqrt()))
    e = torch.cat(errs)
    return {"max_abs": float(e.max()), "mean_abs": float(e.mean()), "rms_fp32": float(np.mean(rms))}
