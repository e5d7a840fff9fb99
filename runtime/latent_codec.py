"""Coding the LFGCM latent: z through the entropy bottleneck, y through uneven channel slices,
each in two checkerboard halves (anchors, then non-anchors).

The loop runs the entropy-parameter graphs on the backend's device and only the arithmetic
coding on the CPU: per round, CDF indexes (one byte each) go down to the coder and integer
symbols come back. Everything between is vectorized tensor code; nothing walks the 491,520
symbols of a 512x768 image in Python.

Coding order (it defines the stream): z; then for slice 0, 1, ...: anchors, non-anchors; within
a half channel-major, then row, then squeezed column. Encoder and decoder compute every index
from the same tensors, and the check value of all symbols (runtime/bitstream.py) makes a
decoder that derived one index differently fail instead of returning a wrong image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from osdiff.config import ModelConfig
from osdiff.export.models.lfgcm import squeeze_anchor, squeeze_nonanchor, unsqueeze_anchor, unsqueeze_nonanchor
from osdiff.runtime.backends.base import GraphRunner
from osdiff.runtime.coder import Decoder, Encoder
from osdiff.runtime.entropy import EntropyBottleneck, GaussianConditional
from osdiff.runtime.profiling import NO_TRACE, Trace


@dataclass
class CodedLatent:
    z_string: bytes
    y_string: bytes
    z_shape: tuple[int, int]
    symbols: list[np.ndarray]  # coding order: z, then every (slice, half)


def compress_latent(
    runner: GraphRunner, cfg: ModelConfig, eb: EntropyBottleneck, gaussian: GaussianConditional,
    y: Tensor, z: Tensor, trace: Trace = NO_TRACE,
) -> tuple[CodedLatent, Tensor]:
    """(y, z) of one image -> the two strings, and y_hat exactly as the decoder will see it."""
    with trace("z_coding"):
        z_string, z_hat, z_symbols = eb.compress(z)
    with trace("hyper_synthesis"):
        (hyper,) = runner.run("hyper_synthesis", z_hat.to(runner.device))
    encoder = Encoder()
    symbols = [z_symbols]
    y_hat_slices: list[Tensor] = []
    for k, (lo, hi) in enumerate(cfg.lfgcm.slice_ranges):
        y_k = y[:, lo:hi]
        with trace(f"slice{k}.anchor.network"):
            out = runner.run(f"entropy_anchor_{k}", hyper, *([torch.cat(y_hat_slices, 1)] if k else []))
        scales, means = out[0], out[1]
        channel_ctx = out[2] if k else None
        anchor_hat = _code(encoder, gaussian, y_k, scales, means, symbols, trace, k, "anchor")
        with trace(f"slice{k}.nonanchor.network"):
            scales, means = runner.run(f"entropy_nonanchor_{k}", anchor_hat, hyper, *([channel_ctx] if k else []))
        y_hat_slices.append(_code(encoder, gaussian, y_k, scales, means, symbols, trace, k, "nonanchor", anchor_hat))
    with trace("y_coding"):
        y_string = encoder.flush()
    return CodedLatent(z_string, y_string, (z.shape[2], z.shape[3]), symbols), torch.cat(y_hat_slices, 1)


def _code(encoder: Encoder, gaussian: GaussianConditional, y_k: Tensor, scales: Tensor, means: Tensor,
          symbols: list[np.ndarray], trace: Trace, k: int, half: str, anchor_hat: Tensor | None = None) -> Tensor:
    """One round, the mirror of _decode: returns what the decoder will reconstruct."""
    with trace(f"slice{k}.{half}.index"):
        values = squeeze_anchor(y_k) if anchor_hat is None else squeeze_nonanchor(y_k)
        if not torch.isfinite(values).all():
            raise ValueError("the latent y is not finite")
        q = torch.round(values - means)
        sym = q.to(torch.int32).cpu().numpy().reshape(-1)
        idx = gaussian.build_indexes(scales).to(torch.uint8).cpu().numpy().reshape(-1)
    with trace(f"slice{k}.{half}.coder"):
        encoder.encode(sym, idx, gaussian.tables)
    with trace(f"slice{k}.{half}.index"):
        symbols.append(sym)
        values = q + means
        return unsqueeze_anchor(values) if anchor_hat is None else anchor_hat + unsqueeze_nonanchor(values)


def decompress_latent(
    runner: GraphRunner, cfg: ModelConfig, eb: EntropyBottleneck, gaussian: GaussianConditional,
    coded: CodedLatent, trace: Trace = NO_TRACE,
) -> Tensor:
    """The two strings -> y_hat; coded.symbols is filled with what was decoded."""
    with trace("z_coding"):
        z_hat, z_symbols = eb.decompress(coded.z_string, coded.z_shape)
    with trace("hyper_synthesis"):
        (hyper,) = runner.run("hyper_synthesis", z_hat.to(runner.device))
    h, w = hyper.shape[2], hyper.shape[3]
    with trace("y_coding"):
        decoder = Decoder(coded.y_string, gaussian.tables, cfg.lfgcm.M * h * w)
    coded.symbols = [z_symbols.reshape(-1)]
    y_hat_slices: list[Tensor] = []
    for k in range(len(cfg.lfgcm.slice_ch)):
        with trace(f"slice{k}.anchor.network"):
            out = runner.run(f"entropy_anchor_{k}", hyper, *([torch.cat(y_hat_slices, 1)] if k else []))
        scales, means = out[0], out[1]
        channel_ctx = out[2] if k else None
        anchor_hat = _decode(decoder, gaussian, scales, means, coded.symbols, trace, k, "anchor")
        with trace(f"slice{k}.nonanchor.network"):
            scales, means = runner.run(f"entropy_nonanchor_{k}", anchor_hat, hyper, *([channel_ctx] if k else []))
        y_hat = _decode(decoder, gaussian, scales, means, coded.symbols, trace, k, "nonanchor", anchor_hat)
        y_hat_slices.append(y_hat)
    return torch.cat(y_hat_slices, 1)


def _decode(decoder: Decoder, gaussian: GaussianConditional, scales: Tensor, means: Tensor,
            symbols: list[np.ndarray], trace: Trace, k: int, half: str, anchor_hat: Tensor | None = None) -> Tensor:
    """One round: the half's values in the full layout (anchors), or the whole decoded slice
    (non-anchors, added to `anchor_hat`)."""
    with trace(f"slice{k}.{half}.index"):
        idx = gaussian.build_indexes(scales).to(torch.uint8).cpu().numpy().reshape(-1)
    with trace(f"slice{k}.{half}.coder"):
        sym = decoder.decode(idx)
    with trace(f"slice{k}.{half}.index"):
        symbols.append(sym)
        values = torch.from_numpy(sym).to(means.device, non_blocking=True).view(means.shape).to(means.dtype) + means
        return unsqueeze_anchor(values) if anchor_hat is None else anchor_hat + unsqueeze_nonanchor(values)
