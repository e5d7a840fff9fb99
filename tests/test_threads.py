"""One Codec shared by threads: every output bit-identical to the single-threaded one."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from osdiff.runtime.backends.torch_backend import TorchBackend
from osdiff.runtime.codec import Codec

THREADS, DECODES = 4, 50


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_four_threads_decode_fifty_times_each_on_one_shared_codec(backend, tiny_model, tiny_export, tiny_image):
    codec = Codec(TorchBackend(tiny_model) if backend == "torch" else OnnxRuntimeBackend(tiny_export))
    # a few streams of different content and seeds; sessions and estimates are warmed here
    streams = [codec.compress(np.roll(tiny_image[:48, :48], 8 * i, axis=1), seed=i) for i in range(4)]
    expected = [codec.decompress(s) for s in streams]

    def work(t: int) -> list[bool]:
        return [np.array_equal(codec.decompress(streams[(t + i) % 4]), expected[(t + i) % 4]) for i in range(DECODES)]

    with ThreadPoolExecutor(THREADS) as pool:
        results = [ok for oks in pool.map(work, range(THREADS)) for ok in oks]
    assert len(results) == THREADS * DECODES and all(results), f"{results.count(False)} outputs differ"
