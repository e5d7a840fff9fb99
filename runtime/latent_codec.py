"""Coding the LFGCM latent: z through the entropy bottleneck, y through uneven channel slices,
each in two checkerboard halves (anchors, then non-anchors).

The loop runs the entropy-parameter graphs and the scale -> CDF index mapping on the backend's
device and only the arithmetic coding on the CPU: per round, CDF indexes (uint8) go to the coder
and int32 symbols come back, nothing else crosses the bus. On CUDA both travel through
page-locked host buffers with one synchronization per round (`_HostBus`); on the CPU the tensors
are the arrays. Everything between is vectorized tensor code; nothing walks the 491,520 symbols
of a 512x768 image in Python.

Coding order (it defines the stream): z; then for slice 0, 1, ...: anchors, non-anchors; within
a half channel-major, then row, then squeezed column. Encoder and decoder compute every index
from the same tensors, and the check value of all symbols (runtime/bitstream.py) makes a
decoder that derived one index differently fail instead of returning a wrong image.
"""

from __future__ import annotations

import threading
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
    if not torch.isfinite(y).all():  # once per image, not per round: it synchronizes a GPU
        raise ValueError("the latent y is not finite")
    with trace("z_coding"):
        z_string, z_hat, z_symbols = eb.compress(z)
    with trace("hyper_synthesis"):
        (hyper,) = runner.run("hyper_synthesis", _upload(z_hat, runner.device))
    bus = _HostBus(runner.device, y[0].numel())
    encoder = Encoder()
    symbols = [z_symbols]
    y_hat_slices: list[Tensor] = []
    for k, (lo, hi) in enumerate(cfg.lfgcm.slice_ranges):
        y_k = y[:, lo:hi]
        with trace(f"slice{k}.anchor.network"):
            out = runner.run(f"entropy_anchor_{k}", hyper, *([torch.cat(y_hat_slices, 1)] if k else []))
        scales, means = out[0], out[1]
        channel_ctx = out[2] if k else None
        anchor_hat = _code(encoder, bus, gaussian, y_k, scales, means, symbols, trace, k, "anchor")
        with trace(f"slice{k}.nonanchor.network"):
            scales, means = runner.run(f"entropy_nonanchor_{k}", anchor_hat, hyper, *([channel_ctx] if k else []))
        y_hat_slices.append(_code(encoder, bus, gaussian, y_k, scales, means, symbols, trace, k, "nonanchor", anchor_hat))
    with trace("y_coding"):
        # the encoder may hold views of the bus's buffers until here; the next image reuses them
        y_string = encoder.flush()
    return CodedLatent(z_string, y_string, (z.shape[2], z.shape[3]), symbols), torch.cat(y_hat_slices, 1)


def _code(encoder: Encoder, bus: "_HostBus", gaussian: GaussianConditional, y_k: Tensor, scales: Tensor, means: Tensor,
          symbols: list[np.ndarray], trace: Trace, k: int, half: str, anchor_hat: Tensor | None = None) -> Tensor:
    """One round, the mirror of _decode: returns what the decoder will reconstruct."""
    with trace(f"slice{k}.{half}.index"):
        values = squeeze_anchor(y_k) if anchor_hat is None else squeeze_nonanchor(y_k)
        q = torch.round(values - means)
        sym, idx = bus.to_host(q.to(torch.int32), gaussian.build_indexes(scales).to(torch.uint8))
    with trace(f"slice{k}.{half}.coder"):
        encoder.encode(sym, idx, gaussian.tables)
    with trace(f"slice{k}.{half}.index"):
        symbols.append(sym.copy() if bus.cuda else sym)  # the check value is computed after the bus is reused
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
        (hyper,) = runner.run("hyper_synthesis", _upload(z_hat, runner.device))
    h, w = hyper.shape[2], hyper.shape[3]
    with trace("y_coding"):
        decoder = Decoder(coded.y_string, gaussian.tables, cfg.lfgcm.M * h * w)
    bus = _HostBus(runner.device, cfg.lfgcm.M * h * w)
    coded.symbols = [z_symbols.reshape(-1)]
    y_hat_slices: list[Tensor] = []
    for k in range(len(cfg.lfgcm.slice_ch)):
        with trace(f"slice{k}.anchor.network"):
            out = runner.run(f"entropy_anchor_{k}", hyper, *([torch.cat(y_hat_slices, 1)] if k else []))
        scales, means = out[0], out[1]
        channel_ctx = out[2] if k else None
        anchor_hat = _decode(decoder, bus, gaussian, scales, means, coded.symbols, trace, k, "anchor")
        with trace(f"slice{k}.nonanchor.network"):
            scales, means = runner.run(f"entropy_nonanchor_{k}", anchor_hat, hyper, *([channel_ctx] if k else []))
        y_hat = _decode(decoder, bus, gaussian, scales, means, coded.symbols, trace, k, "nonanchor", anchor_hat)
        y_hat_slices.append(y_hat)
    return torch.cat(y_hat_slices, 1)


def _decode(decoder: Decoder, bus: "_HostBus", gaussian: GaussianConditional, scales: Tensor, means: Tensor,
            symbols: list[np.ndarray], trace: Trace, k: int, half: str, anchor_hat: Tensor | None = None) -> Tensor:
    """One round: the half's values in the full layout (anchors), or the whole decoded slice
    (non-anchors, added to `anchor_hat`)."""
    with trace(f"slice{k}.{half}.index"):
        (idx,) = bus.to_host(gaussian.build_indexes(scales).to(torch.uint8))
    with trace(f"slice{k}.{half}.coder"):
        sym = decoder.decode(idx)
    with trace(f"slice{k}.{half}.index"):
        symbols.append(sym)
        values = bus.to_device(sym).view(means.shape).to(means.dtype) + means
        return unsqueeze_anchor(values) if anchor_hat is None else anchor_hat + unsqueeze_nonanchor(values)


def _upload(t: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor -> `device`, without waiting for it (through page-locked memory on CUDA)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


class _HostBus:
    """The coder's side of the bus for one image: tensors of the round -> host arrays, decoded
    symbols -> the device.

    On CUDA every round gets its own slice of two page-locked buffers (uint8 indexes, int32
    symbols) as large as the image's y, so the copies are asynchronous, and `to_host` waits
    once per round, on an event after its copies. A slice is written again only by the same
    round of a later image, after that round's own wait, which follows every copy queued
    before it. The buffers are kept per thread and device. On the CPU the tensors themselves
    are returned as arrays."""

    _cache = threading.local()

    def __init__(self, device: torch.device, n_symbols: int) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.at = self.end = 0
        if self.cuda:
            buffers = self._cache.__dict__.setdefault("buffers", {})
            key = (device, n_symbols)
            if key not in buffers:
                buffers.clear()  # one image size at a time: don't pin memory for every size seen
                buffers[key] = (torch.empty(n_symbols, dtype=torch.uint8, pin_memory=True),
                                torch.empty(n_symbols, dtype=torch.int32, pin_memory=True))
            self.indexes, self.symbols = buffers[key]

    def to_host(self, *tensors: Tensor) -> list[np.ndarray]:
        """int32 symbols and/or uint8 indexes of one round (same size) -> flat host arrays,
        valid until this round's slice is reused (by the next image)."""
        n = tensors[0].numel()
        if not self.cuda:
            return [t.reshape(-1).numpy() for t in tensors]
        self.at, self.end = self.end, self.end + n
        if self.end > self.indexes.numel():
            raise ValueError("more symbols than the image's latent holds")
        out = []
        for t in tensors:
            host = (self.indexes if t.dtype == torch.uint8 else self.symbols)[self.at : self.end]
            host.copy_(t.reshape(-1), non_blocking=True)
            out.append(host.numpy())
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        done.synchronize()  # the round's one synchronization
        return out

    def to_device(self, symbols: np.ndarray) -> Tensor:
        """Decoded int32 symbols of the round that last called to_host -> the device."""
        if not self.cuda:
            return torch.from_numpy(symbols)
        host = self.symbols[self.at : self.at + symbols.size]
        host.numpy()[:] = symbols
        return host.to(self.device, non_blocking=True)
