"""Input images (every bit depth, alpha, frames) and output files (atomic, umask)."""

from __future__ import annotations

import os
import stat
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from osdiff.files import ImageError, ImageWarning, read_image, write_atomic


def _png(path, samples: np.ndarray, color_type: int, depth: int = 16) -> None:
    """A PNG written sample by sample (Pillow cannot write 16-bit colour)."""
    h, w = samples.shape[:2]
    raw = b"".join(b"\0" + samples[i].astype(">u2" if depth == 16 else "u1").tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture
def rgb8():
    return np.random.default_rng(0).integers(0, 256, (37, 53, 3)).astype(np.uint8)


def test_16bit_images_round_v_over_257(tmp_path):
    ramp = np.arange(0, 65521, 16, dtype=np.uint32)[: 64 * 64].reshape(64, 64)  # the 0..65520 ramp
    _png(tmp_path / "g16.png", ramp, color_type=0)
    out = read_image(tmp_path / "g16.png")
    expected = np.floor(ramp / 257 + 0.5).astype(np.uint8)
    assert np.array_equal(out, np.repeat(expected[..., None], 3, axis=2))
    assert (out == 255).mean() < 0.01  # was 99.6 % before
    rgb = np.stack([ramp, ramp[::-1], 65535 - ramp], axis=2)
    _png(tmp_path / "rgb16.png", rgb, color_type=2)  # Pillow alone would keep only the high byte
    assert np.array_equal(read_image(tmp_path / "rgb16.png"), np.floor(rgb / 257 + 0.5).astype(np.uint8))


def test_float_images_in_0_1_round_v_times_255(tmp_path):
    v = np.linspace(0, 1, 48 * 32, dtype=np.float32).reshape(48, 32)
    Image.fromarray(v).save(tmp_path / "f.tif")
    out = read_image(tmp_path / "f.tif")
    assert np.array_equal(out[..., 0], np.rint(v.astype(np.float64) * 255).astype(np.uint8))
    assert out.max() == 255 and out.min() == 0  # not "nearly black"
    for bad, message in [(v * 4, r"outside \[0, 1\] \(min 0, max 4\)"), (v - 0.5, r"outside \[0, 1\] \(min -0.5,"),
                         (np.where(v > 0.5, np.nan, v), "768 NaN or infinite"), (np.where(v > 0.5, np.inf, v), "NaN or inf")]:
        Image.fromarray(bad.astype(np.float32)).save(tmp_path / "bad.tif")
        with pytest.raises(ImageError, match=message):
            read_image(tmp_path / "bad.tif")


def test_16bit_pgm_rounds_v_over_257_and_16bit_ppm_is_refused(tmp_path):
    ramp = np.arange(0, 65536, 64, dtype=">u2").reshape(32, 32)
    (tmp_path / "g16.pgm").write_bytes(b"P5\n32 32\n65535\n" + ramp.tobytes())  # Pillow: mode I, not 16-bit
    assert np.array_equal(read_image(tmp_path / "g16.pgm")[..., 1], np.floor(ramp / 257 + 0.5).astype(np.uint8))
    (tmp_path / "c16.ppm").write_bytes(b"P6\n32 32\n65535\n" + np.repeat(ramp, 3).tobytes())  # Pillow: the high byte
    with pytest.raises(ImageError, match="16-bit colour PPM"):
        read_image(tmp_path / "c16.ppm")


def test_32bit_integer_images_are_refused(tmp_path):
    Image.fromarray(np.arange(64, dtype=np.int32).reshape(8, 8) * 1000).save(tmp_path / "i.tif")
    with pytest.raises(ImageError, match="32-bit integer"):
        read_image(tmp_path / "i.tif")


def test_an_image_and_its_exact_8bit_equivalents_read_the_same(tmp_path, rgb8):
    Image.fromarray(rgb8).save(tmp_path / "a.png")
    _png(tmp_path / "a16.png", rgb8.astype(np.uint32) * 257, color_type=2)
    Image.fromarray(np.dstack([rgb8, np.full(rgb8.shape[:2], 255, np.uint8)])).save(tmp_path / "opaque.png")
    gray = rgb8[..., 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray((gray / np.float32(255)).astype(np.float32)).save(tmp_path / "g.tif")
    _png(tmp_path / "g16.png", gray.astype(np.uint32) * 257, color_type=0)
    base = read_image(tmp_path / "a.png")
    assert np.array_equal(base, rgb8)
    for name in ("a16.png", "opaque.png"):
        assert np.array_equal(read_image(tmp_path / name), base), name
    for name in ("g.tif", "g16.png"):
        assert np.array_equal(read_image(tmp_path / name), read_image(tmp_path / "g.png")), name


def test_same_stream_for_an_image_and_its_16bit_equivalent(tmp_path, rgb8, tiny_model):
    from osdiff.runtime.backends.torch_backend import TorchBackend
    from osdiff.runtime.codec import Codec

    Image.fromarray(rgb8).save(tmp_path / "a.png")
    _png(tmp_path / "a16.png", rgb8.astype(np.uint32) * 257, color_type=2)
    codec = Codec(TorchBackend(tiny_model))
    assert codec.compress(read_image(tmp_path / "a.png")) == codec.compress(read_image(tmp_path / "a16.png"))


def test_transparency_is_composited_over_white_with_a_warning(tmp_path, rgb8):
    alpha = np.tile(np.array([0, 128, 255], np.uint8), (37, 18))[:, :53]
    Image.fromarray(np.dstack([rgb8, alpha])).save(tmp_path / "t.png")
    with pytest.warns(ImageWarning, match="composited over white"):
        out = read_image(tmp_path / "t.png")
    a = alpha[..., None].astype(np.int64)
    expected = (rgb8.astype(np.int64) * a + 255 * (255 - a) + 127) // 255
    assert np.array_equal(out, expected.astype(np.uint8))
    assert (out[alpha == 0] == 255).all() and np.array_equal(out[alpha == 255], rgb8[alpha == 255])
    _png(tmp_path / "t16.png", np.dstack([rgb8, alpha]).astype(np.uint32) * 257, color_type=6)
    with pytest.warns(ImageWarning):
        assert np.array_equal(read_image(tmp_path / "t16.png"), out)


def test_only_the_first_frame_is_coded_with_a_warning(tmp_path, rgb8):
    frames = [Image.fromarray(rgb8), Image.fromarray(255 - rgb8)]
    frames[0].save(tmp_path / "m.tif", save_all=True, append_images=frames[1:])
    with pytest.warns(ImageWarning, match="2 frames; only the first"):
        assert np.array_equal(read_image(tmp_path / "m.tif"), rgb8)


def test_16bit_colour_tiff_is_refused_not_truncated(tmp_path):
    # a 16-bit RGB TIFF, written by hand: Pillow would read only the high byte of each sample
    h, w = 4, 5
    data = (np.arange(h * w * 3, dtype="<u2") * 300).tobytes()
    entries = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, 0), (259, 3, 1, 1), (262, 3, 1, 2), (273, 4, 1, 0),
               (277, 3, 1, 3), (278, 3, 1, h), (279, 4, 1, len(data))]
    ifd_at, bps_at = 8, 8 + 2 + 12 * len(entries) + 4
    data_at = bps_at + 6
    out = b"II*\0" + struct.pack("<I", ifd_at) + struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = {258: bps_at, 273: data_at}.get(tag, value)
        out += struct.pack("<HHI", tag, kind, count) + (struct.pack("<HH", value, 0) if kind == 3 and count == 1 else struct.pack("<I", value))
    out += b"\0\0\0\0" + struct.pack("<HHH", 16, 16, 16) + data
    (tmp_path / "c16.tif").write_bytes(out)
    assert Image.open(tmp_path / "c16.tif").mode == "RGB"
    with pytest.raises(ImageError, match="16-bit colour TIFF"):
        read_image(tmp_path / "c16.tif")


def test_broken_files_are_image_errors(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ImageError):
        read_image(tmp_path / "x.png")
    # a header claiming 100000 x 100000 pixels: refused before any pixel is decoded
    header = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    chunks = b"".join(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
                      for kind, data in [(b"IHDR", header), (b"IDAT", zlib.compress(b"")), (b"IEND", b"")])
    (tmp_path / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    with pytest.raises(ImageError, match="huge.png: refused for its size: .*decompression bomb"):
        read_image(tmp_path / "huge.png")


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_honour_the_umask_and_are_atomic(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "out" / "a.osd", b"data")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out" / "a.osd").stat().st_mode) == mode
    assert (tmp_path / "out" / "a.osd").read_bytes() == b"data"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.osd"]  # no temporary left


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        write_atomic(tmp_path / "a.png", b"x")
    assert list(tmp_path.iterdir()) == []
