"""The .osd container (docs/bitstream.md) and the reference implementation's raw format.

Every malformed input raises `StreamError` (one exception type for all of them); every length
and count is bounded before anything is allocated.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from osdiff.runtime.coder import StreamError

MAGIC = b"OD"
VERSION = 2
FLAG_EXTENSIONS = 0x1
FLAG_CRITICAL = 0x2  # an extension changes how the stream decodes: unknown tags are an error
TAG_TILES = 1  # the VAE decoder's tile grid (runtime/tiling.py): varint tile, varint overlap
CRITICAL_TAGS = {TAG_TILES}
MAX_SIDE = 65535
MAX_EXTENSIONS = 16
ID_BYTES = 2  # of the model's weights id, and of its tables id
CHECK_BYTES = 4

__all__ = ["StreamError", "OsdStream", "symbol_check", "read_reference", "write_reference"]


def _put_varint(out: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError("varint must be non-negative")
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise StreamError(f"stream truncated: {what} needs {n} bytes, {len(self.data) - self.pos} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def varint(self, what: str, limit: int) -> int:
        value = 0
        for shift in range(0, 35, 7):  # at most 5 bytes: 32 bits of payload
            byte = self.take(1, what)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if value > limit:
                    raise StreamError(f"{what} = {value} is out of range (max {limit})")
                if shift and byte == 0:
                    raise StreamError(f"{what}: over-long varint")
                return value
        raise StreamError(f"{what}: varint longer than 5 bytes")


def symbol_check(header: bytes, symbols: list[np.ndarray]) -> int:
    """CRC-32 of the header and of every coded symbol (int32, little-endian, coding order).

    Verified after entropy decoding: it catches corrupt strings and, crucially, a decoder that
    derived even one CDF index differently from the encoder, which would otherwise decode to a
    plausible but wrong image.
    """
    crc = zlib.crc32(header)
    for s in symbols:
        crc = zlib.crc32(np.ascontiguousarray(s, dtype="<i4").tobytes(), crc)
    return crc


@dataclass
class OsdStream:
    height: int
    width: int
    seed: int
    weights_id: bytes  # the first ID_BYTES of the model's weights id (runtime/backends/base.py)
    tables_id: bytes  # the first ID_BYTES of its entropy tables' id
    z_string: bytes
    y_string: bytes
    check: int = 0
    extensions: dict[int, bytes] = field(default_factory=dict)

    def header(self) -> bytes:
        """Everything before the z string; covered by the check value."""
        if not (1 <= self.height <= MAX_SIDE and 1 <= self.width <= MAX_SIDE):
            raise ValueError(f"image size {self.height}x{self.width} out of range")
        if not 0 <= self.seed < (1 << 32):
            raise ValueError("seed must fit in 32 bits")
        if len(self.weights_id) != ID_BYTES or len(self.tables_id) != ID_BYTES:
            raise ValueError(f"the weights and tables ids must be {ID_BYTES} bytes each")
        out = bytearray(MAGIC)
        critical = FLAG_CRITICAL if CRITICAL_TAGS & set(self.extensions) else 0
        out.append((VERSION << 4) | (FLAG_EXTENSIONS if self.extensions else 0) | critical)
        for v in (self.height, self.width, self.seed):
            _put_varint(out, v)
        out += self.weights_id + self.tables_id
        _put_varint(out, len(self.z_string))
        if self.extensions:
            _put_varint(out, len(self.extensions))
            for tag, payload in sorted(self.extensions.items()):
                _put_varint(out, tag)
                _put_varint(out, len(payload))
                out += payload
        return bytes(out)

    def to_bytes(self) -> bytes:
        return self.header() + self.z_string + self.y_string + struct.pack("<I", self.check)

    @staticmethod
    def from_bytes(data: bytes) -> "OsdStream":
        data = bytes(data)
        r = _Reader(data)
        if r.take(2, "magic") != MAGIC:
            raise StreamError("not an .osd stream (bad magic bytes)")
        vf = r.take(1, "version")[0]
        version, flags = vf >> 4, vf & 0xF
        if version == 1:
            raise StreamError(".osd version 1 (osdiff-engine 0.1): its model fingerprint depended on the CPU that "
                              "computed it, so this build cannot check it; decode it with osdiff-engine 0.1 and re-encode")
        if version != VERSION:
            raise StreamError(f".osd version {version} is not supported (this build reads version {VERSION})")
        if flags & ~(FLAG_EXTENSIONS | FLAG_CRITICAL) or (flags & FLAG_CRITICAL and not flags & FLAG_EXTENSIONS):
            raise StreamError(f"unknown .osd flags 0x{flags:x}")
        height = r.varint("height", MAX_SIDE)
        width = r.varint("width", MAX_SIDE)
        if not height or not width:
            raise StreamError("image size of zero")
        seed = r.varint("seed", (1 << 32) - 1)
        weights_id = r.take(ID_BYTES, "weights id")
        tables_id = r.take(ID_BYTES, "tables id")
        z_len = r.varint("z string length", len(data))
        extensions: dict[int, bytes] = {}
        if flags & FLAG_EXTENSIONS:
            count = r.varint("extension count", MAX_EXTENSIONS)
            for _ in range(count):
                tag = r.varint("extension tag", (1 << 32) - 1)
                extensions[tag] = r.take(r.varint("extension length", len(data)), "extension")
        unknown = set(extensions) - CRITICAL_TAGS
        if flags & FLAG_CRITICAL and unknown:
            raise StreamError(f"the stream needs extension(s) {sorted(unknown)} to decode, which this decoder does not know")
        z_string = r.take(z_len, "z string")
        y_len = len(data) - r.pos - CHECK_BYTES
        y_string = r.take(y_len, "y string")
        (check,) = struct.unpack("<I", r.take(CHECK_BYTES, "check value"))
        return OsdStream(height, width, seed, weights_id, tables_id, z_string, y_string, check, extensions)


def tile_grid(stream: OsdStream) -> tuple[int, int] | None:
    """(tile, overlap) in pixels from the tiles extension, or None: the VAE decodes whole."""
    payload = stream.extensions.get(TAG_TILES)
    if payload is None:
        return None
    r = _Reader(payload)
    tile, overlap = r.varint("tile size", MAX_SIDE), r.varint("tile overlap", MAX_SIDE)
    if r.pos != len(payload) or not 0 <= overlap < tile:
        raise StreamError(f"bad tile grid extension (tile {tile}, overlap {overlap})")
    return tile, overlap


def tile_extension(tile: int, overlap: int) -> bytes:
    out = bytearray()
    _put_varint(out, tile)
    _put_varint(out, overlap)
    return bytes(out)


def write_reference(z_shape: tuple[int, int], y_string: bytes, z_string: bytes) -> bytes:
    """The original implementation's write_body layout: big-endian uint32 z height, z width,
    string count, then each string (y first, then z) as a uint32 length and its bytes."""
    out = struct.pack(">3I", z_shape[0], z_shape[1], 2)
    for s in (y_string, z_string):
        out += struct.pack(">I", len(s)) + s
    return out


def read_reference(data: bytes) -> tuple[tuple[int, int], bytes, bytes]:
    """-> ((z height, z width), y string, z string). The format carries no image size, seed,
    model identity or check value: the size comes from the user, and a decoder that
    desynchronizes cannot be detected."""
    r = _Reader(bytes(data))
    zh, zw, n = struct.unpack(">3I", r.take(12, "header"))
    if n != 2:
        raise StreamError(f"reference stream with {n} strings; OSDiff writes 2 (y and z)")
    if not (1 <= zh <= MAX_SIDE and 1 <= zw <= MAX_SIDE):
        raise StreamError(f"reference stream z shape {zh}x{zw} out of range")
    strings = []
    for what in ("y string", "z string"):
        (length,) = struct.unpack(">I", r.take(4, what + " length"))
        strings.append(r.take(length, what))
    if r.pos != len(r.data):
        raise StreamError(f"{len(r.data) - r.pos} unexpected bytes after the reference stream")
    return (zh, zw), strings[0], strings[1]
