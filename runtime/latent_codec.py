"""Coding the LFGCM latent: z through the entropy bottleneck, y through uneven channel slices,
each in two checkerboard halves (anchors, then non-anchors).

The loop runs the entropy-parameter graphs on the backend's device. On CUDA the scale -> CDF
index mapping runs there too and only the arithmetic coding on the CPU: per round, CDF indexes
(uint8) go to the coder and int32 symbols come back, through page-locked host buffers with one
synchronization per round (`_HostBus`). On the CPU each round (quantize or decode one
checkerboard half, index its scales, write it into y_hat) is one native call
(runtime/native/checkerboard.hpp), bit for bit what the tensor code computes, and the
encoder's rANS coding is one call for the whole image after the last round. Slices are
written into one y_hat in place, so no round copies the slices before it. Nothing walks the
491,520 symbols of a 512x768 image in Python.

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
from osdiff.runtime.coder import MAX_ABS_SYMBOL, Decoder, Encoder, native
from osdiff.runtime.entropy import EntropyBottleneck, GaussianConditional
from osdiff.runtime.profiling import NO_TRACE, Trace


# On the CPU each coding round is one native call; the tests switch this off to run the tensor
# code that CUDA runs on the CPU too, and check that the two agree bit for bit.
NATIVE_ROUNDS = True


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
    bus = _HostBus(runner.device, y[0].numel())
    if not bus.native and not torch.isfinite(y).all():  # once per image, not per round: it synchronizes a GPU
        raise ValueError("the latent y is not finite")  # (the native rounds refuse it on their own)
    with trace("z_coding"):
        z_string, z_hat, z_symbols = eb.compress(z)
    with trace("hyper_synthesis"):
        (hyper,) = runner.run("hyper_synthesis", _upload(z_hat, runner.device))
    encoder = Encoder()
    symbols = [z_symbols]
    # Slices are written into one y_hat in place: slice k's context is the view y_hat[:, :lo].
    y_hat = torch.empty(y.shape, dtype=torch.float32, device=y.device)
    rounds = _NativeRounds(y, y_hat) if bus.native else None
    for k, (lo, hi) in enumerate(cfg.lfgcm.slice_ranges):
        with trace(f"slice{k}.anchor.network"):
            out = runner.run(f"entropy_anchor_{k}", hyper, *([y_hat[:, :lo]] if k else []))
        scales, means = out[0], out[1]
        channel_ctx = out[2] if k else None
        _code(encoder, bus, rounds, gaussian, y, y_hat, lo, hi, scales, means, symbols, trace, k, True)
        with trace(f"slice{k}.nonanchor.network"):
            scales, means = runner.run(f"entropy_nonanchor_{k}", y_hat[:, lo:hi], hyper, *([channel_ctx] if k else []))
        _code(encoder, bus, rounds, gaussian, y, y_hat, lo, hi, scales, means, symbols, trace, k, False)
    with trace("y_coding"):
        if rounds is not None:
            encoder.encode(rounds.symbols[: rounds.at], rounds.indexes[: rounds.at], gaussian.tables)
        # the encoder may hold views of the bus's buffers (CUDA) until here; the next image reuses them
        y_string = encoder.flush()
    return CodedLatent(z_string, y_string, (z.shape[2], z.shape[3]), symbols), y_hat


class _NativeRounds:
    """The encoder's rounds on the CPU, one native call each (runtime/native/checkerboard.hpp):
    y and y_hat as arrays, and one symbol and one index buffer for the whole image that each
    round fills its part of, so that Python does next to nothing per round and the rANS
    encoder gets the image as one group."""

    def __init__(self, y: Tensor, y_hat: Tensor) -> None:
        self.y, self.y_hat = _array(y), y_hat[0].numpy()
        self.symbols = np.empty(self.y.size, np.int32)
        self.indexes = np.empty(self.y.size, np.uint8)
        self.at = 0

    def quantize(self, gaussian: GaussianConditional, lo: int, hi: int, means: Tensor, scales: Tensor,
                 anchor: bool) -> np.ndarray:
        """One round of channels lo:hi -> its symbols (a view of the image's buffer)."""
        means, scales = _array(means), _array(scales)
        n = means.size
        symbols, indexes = self.symbols[self.at : self.at + n], self.indexes[self.at : self.at + n]
        native().quantize_half(self.y[lo:hi], means, scales, gaussian.scale_index, MAX_ABS_SYMBOL, anchor,
                               self.y_hat[lo:hi], symbols, indexes)
        self.at += n
        return symbols


def _code(encoder: Encoder, bus: "_HostBus", rounds: _NativeRounds | None, gaussian: GaussianConditional, y: Tensor,
          y_hat: Tensor, lo: int, hi: int, scales: Tensor, means: Tensor, symbols: list[np.ndarray], trace: Trace,
          k: int, anchor: bool) -> None:
    """One round, the mirror of _decode: codes one checkerboard half of slice k (channels lo:hi)
    and writes into y_hat what the decoder will reconstruct there. On the CPU in one native
    call (_NativeRounds), elsewhere as tensor code; the two agree bit for bit."""
    half = "anchor" if anchor else "nonanchor"
    if rounds is not None:
        with trace(f"slice{k}.{half}.index"):  # the coding itself is in y_coding, the image at once
            symbols.append(rounds.quantize(gaussian, lo, hi, means, scales, anchor))
        return
    y_k, y_hat_k = y[:, lo:hi], y_hat[:, lo:hi]
    with trace(f"slice{k}.{half}.index"):
        values = squeeze_anchor(y_k) if anchor else squeeze_nonanchor(y_k)
        q = torch.round(values - means)
        sym, idx = bus.to_host(q.to(torch.int32), gaussian.build_indexes(scales).to(torch.uint8))
    with trace(f"slice{k}.{half}.coder"):
        encoder.encode(sym, idx, gaussian.tables)
    with trace(f"slice{k}.{half}.index"):
        symbols.append(sym.copy() if bus.cuda else sym)  # the check value is computed after the bus is reused
        y_hat_k.copy_(unsqueeze_anchor(q + means) if anchor else y_hat_k + unsqueeze_nonanchor(q + means))


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
    y_hat = torch.empty(1, cfg.lfgcm.M, h, w, device=runner.device)
    for k, (lo, hi) in enumerate(cfg.lfgcm.slice_ranges):
        with trace(f"slice{k}.anchor.network"):
            out = runner.run(f"entropy_anchor_{k}", hyper, *([y_hat[:, :lo]] if k else []))
        scales, means = out[0], out[1]
        channel_ctx = out[2] if k else None
        _decode(decoder, bus, gaussian, scales, means, y_hat[:, lo:hi], coded.symbols, trace, k, True)
        with trace(f"slice{k}.nonanchor.network"):
            scales, means = runner.run(f"entropy_nonanchor_{k}", y_hat[:, lo:hi], hyper, *([channel_ctx] if k else []))
        _decode(decoder, bus, gaussian, scales, means, y_hat[:, lo:hi], coded.symbols, trace, k, False)
    return y_hat


def _decode(decoder: Decoder, bus: "_HostBus", gaussian: GaussianConditional, scales: Tensor, means: Tensor,
            y_hat_k: Tensor, symbols: list[np.ndarray], trace: Trace, k: int, anchor: bool) -> None:
    """One round: decodes one checkerboard half of slice k into y_hat_k (1 x C x H x W): the
    anchors (zeros at the non-anchors), then the non-anchors beside them. On the CPU with the
    native coder in one native call, elsewhere as tensor code, bit for bit the same."""
    half = "anchor" if anchor else "nonanchor"
    if bus.native and decoder.fused:
        with trace(f"slice{k}.{half}.coder"):
            symbols.append(decoder.dequantize_half(_array(means), _array(scales), gaussian.scale_index, anchor,
                                                   y_hat_k[0].numpy()))
        return
    with trace(f"slice{k}.{half}.index"):
        (idx,) = bus.to_host(gaussian.build_indexes(scales).to(torch.uint8))
    with trace(f"slice{k}.{half}.coder"):
        sym = decoder.decode(idx)
    with trace(f"slice{k}.{half}.index"):
        symbols.append(sym)
        values = bus.to_device(sym).view(means.shape).to(means.dtype) + means
        y_hat_k.copy_(unsqueeze_anchor(values) if anchor else y_hat_k + unsqueeze_nonanchor(values))


def _array(t: Tensor) -> np.ndarray:
    """A CPU tensor of one image (1 x C x H x W) -> a C-contiguous float32 (C, H, W) array (a view
    when it is one already: this runs several times per coding round)."""
    return np.ascontiguousarray(t.detach().numpy()[0], dtype=np.float32)


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
        self.native = device.type == "cpu" and NATIVE_ROUNDS  # rounds as one native call each
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
