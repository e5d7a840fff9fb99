"""The coding rounds of y: the CPU's native round (runtime/native/checkerboard.hpp) against the
tensor code that CUDA runs, bit for bit, and whole streams made either way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from osdiff.export.models.lfgcm import squeeze_anchor, squeeze_nonanchor, unsqueeze_anchor, unsqueeze_nonanchor
from osdiff.runtime import latent_codec
from osdiff.runtime.backends.torch_backend import TorchBackend
from osdiff.runtime.bitstream import StreamError
from osdiff.runtime.codec import Codec
from osdiff.runtime.coder import MAX_ABS_SYMBOL, Decoder, Encoder, native
from osdiff.runtime.entropy import GaussianConditional


@pytest.fixture(scope="module")
def gaussian():
    return GaussianConditional()


def round_inputs(seed: int, c: int = 5, h: int = 6, w: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, means, scales with the awkward cases in them: exact ties (x.5, which rounds to even),
    signed zeros, symbols far outside the tables, scales on and beside table entries, NaN."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(1, c, h, w, generator=g) * 4
    means = torch.randn(1, c, h, w // 2, generator=g)
    y.view(-1)[:8] = torch.tensor([0.5, 1.5, -0.5, -2.5, -0.0, 0.0, 3000.25, -1e4])
    means.view(-1)[:6] = torch.tensor([0.0, 0.0, -0.0, 0.0, -0.0, 0.5])
    y.view(-1)[8:16] = means.view(-1)[8:16] + torch.tensor([0.5, -0.5, 2.5, -3.5, 0.0, -0.0, 7.5, 0.25])
    table = GaussianConditional().scale_table
    scales = torch.rand(1, c, h, w // 2, generator=g) * 30
    scales.view(-1)[:6] = torch.tensor([table[0], table[5], torch.nextafter(table[5], torch.tensor(0.0)), -1.0,
                                        float("nan"), float("inf")])
    return y, means, scales


def tensor_round(gaussian, y, means, scales, y_hat, anchor: bool) -> tuple[np.ndarray, np.ndarray]:
    """What latent_codec runs on CUDA, here on the CPU."""
    values = squeeze_anchor(y) if anchor else squeeze_nonanchor(y)
    q = torch.round(values - means)
    values = q + means
    y_hat.copy_(unsqueeze_anchor(values) if anchor else y_hat + unsqueeze_nonanchor(values))
    return q.to(torch.int32).reshape(-1).numpy(), gaussian.build_indexes(scales).reshape(-1).numpy()


def native_round(gaussian, y, means, scales, y_hat, anchor: bool) -> tuple[np.ndarray, np.ndarray]:
    """The native round, with output buffers of its own."""
    n = means.numel()
    sym, idx = np.full(n, 99, np.int32), np.full(n, 99, np.uint8)
    native().quantize_half(y[0].numpy(), means[0].numpy(), scales[0].numpy(), gaussian.scale_index, MAX_ABS_SYMBOL,
                           anchor, y_hat[0].numpy(), sym, idx)
    return sym, idx


def bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int32).numpy()  # -0.0 and 0.0 differ here


@pytest.mark.parametrize("seed", range(4))
def test_native_round_is_the_tensor_code_bit_for_bit(gaussian, seed):
    y, means_a, scales_a = round_inputs(seed)
    _, means_n, scales_n = round_inputs(seed + 100)
    ours, theirs = torch.full_like(y, 7.0), torch.full_like(y, 7.0)  # whatever was there before is overwritten
    for anchor, means, scales in ((True, means_a, scales_a), (False, means_n, scales_n)):
        sym, idx = native_round(gaussian, y, means, scales, ours, anchor)
        sym_t, idx_t = tensor_round(gaussian, y, means, scales, theirs, anchor)
        np.testing.assert_array_equal(sym, sym_t)
        np.testing.assert_array_equal(idx, idx_t)
        np.testing.assert_array_equal(bits(ours), bits(theirs))
    # and the decoder's round puts back the same y_hat from the coded string
    enc = Encoder("native")
    for anchor, means, scales in ((True, means_a, scales_a), (False, means_n, scales_n)):
        sym, idx = native_round(gaussian, y, means, scales, torch.empty_like(y), anchor)
        enc.encode(sym, idx, gaussian.tables)
    dec = Decoder(enc.flush(), gaussian.tables, y.numel())
    decoded = torch.full_like(y, -7.0)
    for anchor, means, scales in ((True, means_a, scales_a), (False, means_n, scales_n)):
        dec.dequantize_half(means[0].numpy(), scales[0].numpy(), gaussian.scale_index, anchor, decoded[0].numpy())
    np.testing.assert_array_equal(bits(decoded), bits(ours))


def test_native_round_refuses_what_it_cannot_code(gaussian):
    y, means, scales = round_inputs(0)
    y_hat = torch.empty_like(y)
    for bad in (float("nan"), float("inf"), float(MAX_ABS_SYMBOL) * 2):
        y_bad = y.clone()
        y_bad.view(-1)[3] = bad
        with pytest.raises(ValueError, match="latent value out of range"):
            native_round(gaussian, y_bad, means, scales, y_hat, True)
    with pytest.raises(ValueError, match=r"\(C, H, W/2\)"):
        native_round(gaussian, y, means[:, :, :, :3].contiguous(), scales, y_hat, True)
    odd = torch.zeros(1, 5, 6, 7)
    with pytest.raises(ValueError, match="width must be even"):
        native_round(gaussian, odd, means, scales, odd, True)
    with pytest.raises(TypeError):  # float64: refused, never converted behind the caller's back
        native_round(gaussian, y.double(), means, scales, y_hat, True)
    n = means.numel()
    for max_abs in (-1, (1 << 30) + 1, 1 << 40):  # beyond 2**30 a |q| <= max_abs might not fit int32
        with pytest.raises(ValueError, match="max_abs"):
            native().quantize_half(y[0].numpy(), means[0].numpy(), scales[0].numpy(), gaussian.scale_index, max_abs,
                                   True, y_hat[0].numpy(), np.empty(n, np.int32), np.empty(n, np.uint8))
    for sym, idx in ((np.empty(n - 1, np.int32), np.empty(n, np.uint8)), (np.empty(n, np.int32), np.empty(n + 1, np.uint8))):
        with pytest.raises(ValueError, match="must hold the half's"):
            native().quantize_half(y[0].numpy(), means[0].numpy(), scales[0].numpy(), gaussian.scale_index,
                                   MAX_ABS_SYMBOL, True, y_hat[0].numpy(), sym, idx)


def test_a_refused_decoding_round_decodes_nothing(gaussian):
    y, means, scales = round_inputs(2)
    sym, idx = native_round(gaussian, y, means, scales, torch.empty_like(y), True)
    enc = Encoder("native")
    enc.encode(sym, idx, gaussian.tables)
    dec = Decoder(enc.flush(), gaussian.tables, means.numel())
    out = torch.empty_like(y)
    with pytest.raises(ValueError, match=r"\(C, H, W/2\)"):
        dec.dequantize_half(means[0, :, :, :3].contiguous().numpy(), scales[0].numpy(), gaussian.scale_index, True,
                            out[0].numpy())
    got = dec.dequantize_half(means[0].numpy(), scales[0].numpy(), gaussian.scale_index, True, out[0].numpy())
    np.testing.assert_array_equal(got, sym)


def test_native_decoding_round_on_a_corrupt_string_raises(gaussian):
    _, means, scales = round_inputs(1)
    dec = Decoder(b"\xff" * 7 + b"\x7f" + b"\xff" * 64, gaussian.tables, means.numel())
    with pytest.raises(StreamError):
        dec.dequantize_half(means[0].numpy(), scales[0].numpy(), gaussian.scale_index, True,
                            torch.empty(1, 5, 6, 8)[0].numpy())


def test_streams_do_not_depend_on_which_rounds_coded_them(tiny_model, tiny_image, monkeypatch):
    """The tiny model's stream and pixels with the native rounds and with the tensor code (what
    CUDA runs), each decoding the other's stream."""
    codec = Codec(TorchBackend(tiny_model))
    native_stream = codec.compress(tiny_image)
    native_pixels = codec.decompress(native_stream)
    monkeypatch.setattr(latent_codec, "NATIVE_ROUNDS", False)
    assert codec.compress(tiny_image) == native_stream
    np.testing.assert_array_equal(codec.decompress(native_stream), native_pixels)
