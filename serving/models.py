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

Errors (`error_report`): a bad request (RequestError: the codec's StreamError or ValueError,
e.g. a malformed or foreign stream, an image over the pixel limit) is the client's fault and is
answered with Triton's INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT) and the codec's message;
anything else is the server's, answered with INTERNAL (HTTP 500, gRPC INTERNAL) and an incident
id only, its traceback logged on the server. No answer carries a traceback or a server path.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from osdiff.runtime.codec import Codec
from osdiff.runtime.coder import StreamError

LOG = logging.getLogger("osdiff.serving")

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
    """A request the codec cannot serve: the client's fault. The message names the problem (and
    the item, for a request of several); `request` is the index of the request at fault among
    those of one call (with the dynamic batcher a call holds several), None when unknown."""

    def __init__(self, message: str, request: int | None = None) -> None:
        super().__init__(message)
        self.request = request


# What the codec raises for a bad input (a malformed or foreign stream, a wrong image, one over
# the pixel or memory limit): the client's fault. Anything else is the server's.
CLIENT_ERRORS = (StreamError, ValueError)


Inputs = Mapping[str, np.ndarray]
Outputs = dict[str, np.ndarray]
T = TypeVar("T")
R = TypeVar("R")


class CodecModels:
    """Serves `osdiff_compress` and `osdiff_decompress` requests with one Codec.

    batched: the tensors carry a leading batch dimension (the model was configured with a
    max batch size); items of one size from all the requests of a call run as one batch.
    Raises RequestError naming the bad item and its request (a client's fault); any other
    exception is a failure of the server. `error_report` turns either into the error response.
    """

    def __init__(self, codec: Codec, batched: bool) -> None:
        self.codec = codec
        self.batched = batched

    def compress(self, requests: Sequence[Inputs]) -> list[Outputs]:
        images: list[np.ndarray] = []
        seeds: list[int] = []
        owner: list[int] = []  # the request of each item
        for k, r in enumerate(requests):
            image = self._items(_required(r, "image", k), 3, k)
            seed = self._items(r["seed"], 1, k) if "seed" in r else np.zeros((len(image), 1), np.uint32)
            if len(seed) != len(image):
                raise RequestError(f"{len(image)} image(s) but {len(seed)} seed(s) in one request", k)
            if image.shape[1] < 1 or image.shape[2] < 1:
                raise RequestError(f"empty image ({image.shape[1]}x{image.shape[2]})", k)
            images += list(image)
            seeds += [int(s[0]) for s in seed]
            owner += [k] * len(image)
        streams: list[bytes | None] = [None] * len(images)
        for shape in dict.fromkeys(im.shape for im in images):  # one batch per image size
            idx = [i for i, im in enumerate(images) if im.shape == shape]
            out = _batch_or_each(idx, lambda ii: self.codec.compress_batch([images[i] for i in ii], [seeds[i] for i in ii]),
                                 lambda i: self.codec.compress(images[i], seeds[i]), owner)
            for i, s in zip(idx, out):
                streams[i] = s
        return [{"stream": self._batch(np.array([[s] for s in chunk], dtype=np.object_))}
                for chunk in _split(streams, owner, len(requests))]

    def decompress(self, requests: Sequence[Inputs]) -> list[Outputs]:
        datas: list[bytes] = []
        owner: list[int] = []
        for k, r in enumerate(requests):
            stream = self._items(_required(r, "stream", k), 1, k)
            datas += [_as_bytes(s[0], k) for s in stream]
            owner += [k] * len(stream)
        # Streams of one image size decode as a batch; mixed sizes (or a bad stream) fall back
        # to one at a time, which also names the bad one.
        images = _batch_or_each(list(range(len(datas))), lambda ii: self.codec.decompress_batch([datas[i] for i in ii]),
                                lambda i: self.codec.decompress(datas[i]), owner)
        out = []
        for k, chunk in enumerate(_split(images, owner, len(requests))):
            if len({im.shape for im in chunk}) != 1:
                raise RequestError("the streams of one request decode to images of different sizes; send them apart", k)
            out.append({"image": self._batch(np.stack(chunk))})
        return out

    def _items(self, x: np.ndarray, ndim: int, request: int) -> np.ndarray:
        """The items of one input: batch x item shape (a batch of one without batching)."""
        items = x if self.batched else x[None]
        if items.ndim != ndim + 1:
            raise RequestError(f"expected {ndim} dimensions per item, got shape {list(x.shape)}", request)
        return items

    def _batch(self, x: np.ndarray) -> np.ndarray:
        return x if self.batched else x[0]


def _required(inputs: Inputs, name: str, request: int) -> np.ndarray:
    # Triton lets a request without a required input through to the model (PyTriton's configs)
    if name not in inputs:
        raise RequestError(f"the request has no input '{name}'", request)
    return inputs[name]


def _as_bytes(x: object, request: int) -> bytes:
    if isinstance(x, (bytes, np.bytes_)):
        return bytes(x)
    raise RequestError(f"stream must be BYTES, got {type(x).__name__}", request)


def _batch_or_each(items: list[int], batch: Callable[[list[int]], list[R]], one: Callable[[int], R],
                   owner: list[int]) -> list[R]:
    """`batch` on the items (indexes into this call's items; owner[i]: the request of item i);
    if that fails, `one` per item, so that the error names the bad one (or, when none fails
    alone, each is served alone). Raises RequestError for a client error (CLIENT_ERRORS) of an
    item; anything else propagates: the server's fault."""
    if len(items) > 1:
        try:
            return batch(items)
        except Exception:
            pass
    out = []
    for i in items:
        try:
            out.append(one(i))
        except CLIENT_ERRORS as e:
            k = owner[i]
            mine = [j for j, o in enumerate(owner) if o == k]
            where = f"item {mine.index(i) + 1} of {len(mine)} in this request: " if len(mine) > 1 else ""
            raise RequestError(f"{where}{type(e).__name__}: {e}", k) from e
    return out


def _split(items: list[T], owner: list[int], requests: int) -> list[list[T]]:
    return [[x for x, o in zip(items, owner) if o == k] for k in range(requests)]


def error_report(e: Exception) -> dict[str, Any]:
    """What a client is told of an exception raised by CodecModels: {"code": Triton's error code
    ("INVALID_ARG" for a RequestError, else "INTERNAL"), "message", "request": the index of the
    request at fault in its call, None for all}. An internal error's message is an incident id
    only; its traceback goes to the log (logger "osdiff.serving") under that id."""
    if isinstance(e, RequestError):
        return {"code": "INVALID_ARG", "message": str(e), "request": e.request}
    incident = uuid.uuid4().hex[:12]
    LOG.error("internal error %s while serving a request", incident, exc_info=e)
    return {"code": "INTERNAL", "message": f"internal server error {incident} (details in the server's log)",
            "request": None}
