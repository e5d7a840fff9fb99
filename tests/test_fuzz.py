"""Seeded fuzzing of the decoder: 10,000 damaged streams (see fuzz_streams.py for more)."""

from __future__ import annotations

from fuzz_streams import MUTATIONS, fuzz, tiny_streams
from osdiff.runtime.backends.torch_backend import TorchBackend
from osdiff.runtime.codec import Codec


def test_ten_thousand_damaged_streams_raise_only_stream_error(tiny_model, capsys):
    # A damaged header may ask for any size up to the limit; a small limit keeps 10,000 cases fast.
    codec = Codec(TorchBackend(tiny_model), max_pixels=256 * 256)
    outcomes = fuzz(codec, tiny_streams(codec), cases=10_000, seed=1234)
    with capsys.disabled():
        print("\nfuzz outcomes:", dict(sorted(outcomes.items())))
    assert sum(v for k, v in outcomes.items() if ":" in k) == 10_000
    for kind in MUTATIONS:
        assert outcomes[f"{kind}: StreamError"] > 0, kind
