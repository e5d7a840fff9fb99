"""The .osd container and the reference raw format, on their own (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from osdiff.runtime.bitstream import OsdStream, StreamError, read_reference, symbol_check, write_reference
from osdiff.runtime.noise import gaussian_noise


def make(**kw) -> OsdStream:
    base = dict(height=512, width=768, seed=0, weights_id=b"\xab\xcd", tables_id=b"\x12\x34", z_string=b"z" * 300,
                y_string=b"y" * 1200, check=123456)
    base.update(kw)
    return OsdStream(**base)


def test_round_trip_and_overhead():
    s = make()
    data = s.to_bytes()
    assert OsdStream.from_bytes(data) == s
    assert len(data) - len(s.z_string) - len(s.y_string) == 18


def test_extensions_round_trip_and_cost_nothing_when_absent():
    s = make(extensions={7: b"future", 9: b""})  # tags no decoder needs: skipped when unknown
    t = OsdStream.from_bytes(s.to_bytes())
    assert t.extensions == {7: b"future", 9: b""} and t.y_string == s.y_string


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: b"XX" + d[2:], "magic"),
        (lambda d: d[:2] + bytes([0x30]) + d[3:], "version 3"),
        (lambda d: d[:2] + bytes([0x10]) + d[3:], "version 1 .osdiff-engine 0.1.: its model fingerprint depended"),
        (lambda d: d[:2] + bytes([0x2E]) + d[3:], "flags"),
        (lambda d: d[:3] + b"\x80\x80\x80\x80\x80\x01" + d[5:], "varint"),
        (lambda d: d[:3] + b"\x80\x00" + d[5:], "over-long"),
        (lambda d: d[:3] + b"\x00" + d[5:], "zero"),
        (lambda d: d[:3] + b"\xff\xff\x7f" + d[5:], "out of range"),
    ],
)
def test_malformed_headers(mutate, message):
    with pytest.raises(StreamError, match=message):
        OsdStream.from_bytes(mutate(make().to_bytes()))


def test_every_truncation_is_an_error():
    data = make(z_string=b"z" * 5, y_string=b"y" * 8).to_bytes()
    header_and_z = len(make(z_string=b"z" * 5, y_string=b"").header()) + 5
    for n in range(len(data)):
        if n >= header_and_z + 4:
            continue  # past the z string the y string just gets shorter: the check value catches it
        with pytest.raises(StreamError):
            OsdStream.from_bytes(data[:n])


def test_symbol_check_sees_every_symbol_and_the_header():
    header = make().header()
    syms = [np.arange(-50, 50, dtype=np.int32), np.zeros(1000, np.int32)]
    base = symbol_check(header, syms)
    assert symbol_check(header, [s.copy() for s in syms]) == base
    flipped = [syms[0].copy(), syms[1].copy()]
    flipped[1][777] = 1
    assert symbol_check(header, flipped) != base
    assert symbol_check(make(seed=1).header(), syms) != base


def test_reference_format_reads_and_writes_the_golden_stream(tiny_dir):
    data = (tiny_dir / "stream.bin").read_bytes()
    shape, y, z = read_reference(data)
    assert shape == (2, 3)
    assert y == (tiny_dir / "y_string.bin").read_bytes() and z == (tiny_dir / "z_string.bin").read_bytes()
    assert write_reference(shape, y, z) == data
    for n in range(len(data)):
        with pytest.raises(StreamError):
            read_reference(data[:n])
    with pytest.raises(StreamError):
        read_reference(data + b"\x00")


def test_noise_is_a_pure_function_of_seed_and_shape():
    a = gaussian_noise(5, (1, 4, 16, 24))
    assert a.dtype == np.float32 and a.shape == (1, 4, 16, 24)
    assert np.array_equal(a, gaussian_noise(5, (1, 4, 16, 24)))
    assert not np.array_equal(a, gaussian_noise(6, (1, 4, 16, 24)))
    big = gaussian_noise(1, (1, 4, 64, 96)).ravel()
    assert abs(big.mean()) < 0.03 and abs(big.std() - 1) < 0.03
    # pinned values: any change to the generator breaks every stream ever written
    np.testing.assert_array_equal(gaussian_noise(0, (4,)), PINNED)


PINNED = np.array([-0.6249173879623413, -1.8672517538070679, 0.6808263063430786, -0.31644144654273987], dtype=np.float32)
