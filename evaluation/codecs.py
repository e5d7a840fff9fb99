"""The codecs an evaluation runs, each at one rate point: OSDiff, and Pillow's JPEG and WebP.

Every codec writes real streams: `encode` returns the bytes a file would hold (the .osd
container, a complete JPEG or WebP file with its headers), and the evaluation's bpp is
8 * (bytes written) / pixels. The classical baselines are swept over quality so that their
curves cover the rates of the learned codec.
"""

from __future__ import annotations

import io
from typing import Protocol

import numpy as np
import PIL
from PIL import Image, features

from osdiff.runtime.codec import Codec

# Qualities of the default sweeps: from each format's lowest rate up to near-transparent.
DEFAULT_QUALITIES = {"jpeg": (1, 3, 5, 10, 20, 30, 50, 70, 90), "webp": (0, 5, 10, 20, 30, 50, 70, 90)}


class ImageCodec(Protocol):
    label: str  # names this rate point (unique within an evaluation; a folder name)
    suffix: str  # file extension of its streams
    quality: int | None  # the Pillow quality, None for OSDiff

    def encode(self, image: np.ndarray) -> bytes: ...

    def decode(self, data: bytes) -> np.ndarray: ...


class OSDiffCodec:
    """The engine's codec (runtime/codec.py) on any backend; one model is one rate point."""

    suffix = ".osd"
    quality = None

    def __init__(self, codec: Codec, label: str, seed: int = 0) -> None:
        self.codec, self.label, self.seed = codec, label, seed

    def encode(self, image: np.ndarray) -> bytes:
        return self.codec.compress(image, seed=self.seed)

    def decode(self, data: bytes) -> np.ndarray:
        return self.codec.decompress(data)


class PillowCodec:
    """JPEG or WebP through Pillow at one quality, every other setting Pillow's default (JPEG:
    baseline, 4:2:0 chroma subsampling, standard Huffman tables; WebP: lossy, method 4)."""

    def __init__(self, fmt: str, quality: int) -> None:
        if fmt not in DEFAULT_QUALITIES:
            raise ValueError(f"unknown Pillow codec {fmt!r} (jpeg or webp)")
        if fmt == "webp" and not features.check("webp"):
            raise ValueError("this Pillow was built without WebP support")
        if not 0 <= quality <= 100:
            raise ValueError(f"quality must be within 0..100, got {quality}")
        self.fmt, self.quality = fmt, quality
        self.label = f"{fmt}-q{quality}"
        self.suffix = ".jpg" if fmt == "jpeg" else ".webp"

    def encode(self, image: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format=self.fmt.upper(), quality=self.quality)
        return buf.getvalue()

    def decode(self, data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def pillow_description(fmt: str) -> str:
    library = (f"libjpeg-turbo {features.version('libjpeg_turbo')}" if fmt == "jpeg"
               else f"libwebp {features.version('webp')}")
    return f"Pillow {PIL.__version__} {fmt.upper()} ({library}), quality swept, other settings Pillow's defaults"
