"""The two Triton models: their names, inputs and outputs, and what they do with the requests
Triton hands them. `osdiff serve` (PyTriton) and the Python-backend models of `osdiff triton-repo`
both call this; it calls runtime/codec.py and nothing deeper.

    osdiff_compress    image  UINT8  [H, W, 3]   (an RGB image)
                       seed   UINT32 [1]         (optional; the diffusion-noise seed, default 0)
                    -> stream BYTES  [1]         (one .osd stream, docs/bitstream.md)
    osdiff_decompress  stream BYTES  [1]
                    -> image  UINT8  [H, W, 3]

With batching on, every tensor has a leading batch dimension and one request may carry several
images or streams.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from osdiff.runtime.codec import Codec

COMPRESS = "osdiff_compress"
DECOMPRESS = "osdiff_decompress"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: Any  # numpy dtype; BYTES travel as object arrays of `bytes`
    shape: tuple[int, ...]  # without the batch dimension; -1: any size
    triton_dtype: str
    optional: bool = False


IMAGE = TensorSpec("image", np.uint8, (-1, -1, 3), "UINT8")
SEED = TensorSpec("seed", np.uint32, (1,), "UINT32", optional=True)
STREAM = TensorSpec("stream", np.object_, (1,), "BYTES")

INPUTS = {COMPRESS: (IMAGE, SEED), DECOMPRESS: (STREAM,)}
OUTPUTS = {COMPRESS: (STREAM,), DECOMPRESS: (IMAGE,)}


class RequestError(ValueError):
    """A request the codec cannot serve; the message names the request and the problem."""


Inputs = Mapping[str, np.ndarray]
Outputs = dict[str, np.ndarray]
T = TypeVar("T")
R = TypeVar("R")


class CodecModels:
    """Serves `osdiff_compress` and `osdiff_decompress` requests with one Codec.

    batched: the tensors carry a leading batch dimension (the model was configured with a
    max batch size); items of one size from all the requests of a call run as one batch.
    Raises RequestError naming the bad item; Triton turns it into the error response.
    """

    def __init__(self, codec: Codec, batched: bool) -> None:
        self.codec = codec
        self.batched = batched

    def compress(self, requests: Sequence[Inputs]) -> list[Outputs]:
        images: list[np.ndarray] = []
        seeds: list[int] = []
        counts = []
        for r in requests:
            image = self._items(r["image"], 3)
            seed = self._items(r["seed"], 1) if "seed" in r else np.zeros((len(image), 1), np.uint32)
            if len(seed) != len(image):
                raise RequestError(f"{len(image)} image(s) but {len(seed)} seed(s) in one request")
            if image.shape[1] < 1 or image.shape[2] < 1:
                raise RequestError(f"empty image ({image.shape[1]}x{image.shape[2]})")
            images += list(image)
            seeds += [int(s[0]) for s in seed]
            counts.append(len(image))
        streams: list[bytes | None] = [None] * len(images)
        for shape in dict.fromkeys(im.shape for im in images):  # one batch per image size
            idx = [i for i, im in enumerate(images) if im.shape == shape]
            out = _batch_or_each(idx, lambda ii: self.codec.compress_batch([images[i] for i in ii], [seeds[i] for i in ii]),
                                 lambda i: self.codec.compress(images[i], seeds[i]), len(images))
            for i, s in zip(idx, out):
                streams[i] = s
        return [{"stream": self._batch(np.array([[s] for s in chunk], dtype=np.object_))}
                for chunk in _split(streams, counts)]

    def decompress(self, requests: Sequence[Inputs]) -> list[Outputs]:
        datas: list[bytes] = []
        counts = []
        for r in requests:
            stream = self._items(r["stream"], 1)
            datas += [_as_bytes(s[0]) for s in stream]
            counts.append(len(stream))
        # Streams of one image size decode as a batch; mixed sizes (or a bad stream) fall back
        # to one at a time, which also names the bad one.
        images = _batch_or_each(list(range(len(datas))), lambda ii: self.codec.decompress_batch([datas[i] for i in ii]),
                                lambda i: self.codec.decompress(datas[i]), len(datas))
        out = []
        for chunk in _split(images, counts):
            if len({im.shape for im in chunk}) != 1:
                raise RequestError("the streams of one request decode to images of different sizes; send them apart")
            out.append({"image": self._batch(np.stack(chunk))})
        return out

    def _items(self, x: np.ndarray, ndim: int) -> np.ndarray:
        """The items of one input: batch x item shape (a batch of one without batching)."""
        items = x if self.batched else x[None]
        if items.ndim != ndim + 1:
            raise RequestError(f"expected {ndim} dimensions per item, got shape {list(x.shape)}")
        return items

    def _batch(self, x: np.ndarray) -> np.ndarray:
        return x if self.batched else x[0]


def _as_bytes(x: object) -> bytes:
    if isinstance(x, (bytes, np.bytes_)):
        return bytes(x)
    raise RequestError(f"stream must be BYTES, got {type(x).__name__}")


def _batch_or_each(items: list[int], batch: Callable[[list[int]], list[R]], one: Callable[[int], R],
                   total: int) -> list[R]:
    """`batch` on the items (indexes into this call's `total` items); if that fails, `one` per
    item, so that the error names the bad one (or, when none fails alone, each is served alone)."""
    if len(items) > 1:
        try:
            return batch(items)
        except Exception:
            pass
    out = []
    for i in items:
        try:
            out.append(one(i))
        except Exception as e:
            # PyTriton answers a whole batch with one error: say so to the others in it
            where = f"item {i + 1} of {total} in this dynamic batch (the batch fails with it): " if total > 1 else ""
            raise RequestError(f"{where}{type(e).__name__}: {e}") from e
    return out


def _split(items: list[T], counts: list[int]) -> list[list[T]]:
    out, start = [], 0
    for n in counts:
        out.append(items[start : start + n])
        start += n
    return out
