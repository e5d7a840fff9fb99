"""Fuzzing the decoder with damaged .osd streams.

Every damaged stream must either raise StreamError (the one documented error) or, when the
damage happens not to change a single coded symbol, decode to exactly the original image. No
other exception, no crash, no hang.

Run more cases than CI does:  python tests/fuzz_streams.py --cases 1000000 [--seed S] [--coder compressai]
(uses the tiny reference model in ../shared/reference/tiny, or --reference DIR; the default
coder is the native one).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import numpy as np

from osdiff.runtime.bitstream import StreamError
from osdiff.runtime.codec import Codec
from osdiff.runtime.coder import CODERS, current_coder, use_coder

MUTATIONS = ("bit_flips", "truncate", "extend", "splice_header", "random_bytes", "set_bytes", "insert_delete", "header_field")


def mutate(rng: np.random.Generator, data: bytes, others: list[bytes], kind: str) -> bytes:
    b = bytearray(data)
    if kind == "bit_flips":
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(0, len(b)))
            b[i] ^= 1 << int(rng.integers(0, 8))
    elif kind == "truncate":
        del b[int(rng.integers(0, len(b))):]
    elif kind == "extend":
        b += rng.integers(0, 256, int(rng.integers(1, 100)), dtype=np.uint8).tobytes()
    elif kind == "splice_header":
        donor = others[int(rng.integers(0, len(others)))]
        cut, cut_d = int(rng.integers(3, 20)), int(rng.integers(3, 20))
        b = bytearray(donor[:cut_d]) + b[cut:]
    elif kind == "random_bytes":
        n = int(rng.integers(0, 2 * len(data)))
        b = bytearray(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        if rng.random() < 0.5:
            b[:3] = data[:3]  # past the magic and version check
    elif kind == "set_bytes":
        for _ in range(int(rng.integers(1, 4))):
            if b:
                b[int(rng.integers(0, len(b)))] = int(rng.choice([0, 0xFF, 0x80, 0x7F]))
    elif kind == "insert_delete":
        i = int(rng.integers(0, len(b) + 1))
        if rng.random() < 0.5:
            b[i:i] = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
        else:
            del b[i : i + int(rng.integers(1, 9))]
    elif kind == "header_field":
        i = int(rng.integers(3, min(16, len(b))))
        b[i] = int(rng.integers(0, 256))
    return bytes(b)


def fuzz(codec: Codec, streams: list[tuple[bytes, np.ndarray]], cases: int, seed: int = 0,
         max_seconds_per_case: float = 10.0) -> Counter:
    """Returns how often each outcome happened; raises AssertionError on a wrong outcome."""
    rng = np.random.default_rng(seed)
    outcomes: Counter = Counter()
    blobs = [s for s, _ in streams]
    worst = 0.0
    for case in range(cases):
        data, original = streams[int(rng.integers(0, len(streams)))]
        kind = MUTATIONS[case % len(MUTATIONS)]
        bad = mutate(rng, data, blobs, kind)
        t0 = time.perf_counter()
        try:
            image = codec.decompress(bad)
        except StreamError:
            outcomes[f"{kind}: StreamError"] += 1
        else:
            same = any(bad == d for d in blobs) or np.array_equal(image, original)
            assert same, f"case {case} ({kind}): a damaged stream decoded to a different image"
            outcomes[f"{kind}: decoded unchanged"] += 1
        worst = max(worst, time.perf_counter() - t0)
        assert worst < max_seconds_per_case, f"case {case} ({kind}) took {worst:.1f} s"
    outcomes["slowest case (ms)"] = int(worst * 1000)
    return outcomes


def tiny_streams(codec: Codec, n: int = 4) -> list[tuple[bytes, np.ndarray]]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        h, w = int(rng.integers(40, 130)), int(rng.integers(40, 130))
        image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        data = codec.compress(image, seed=i)
        out.append((data, codec.decompress(data)))
    return out


def main() -> None:
    from osdiff.config import ModelConfig
    from osdiff.export.model import OSDiffModel
    from osdiff.runtime.backends.torch_backend import TorchBackend

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", type=Path, default=Path(__file__).resolve().parents[2] / "shared/reference/tiny")
    parser.add_argument("--coder", choices=CODERS, default=current_coder())
    args = parser.parse_args()
    use_coder(args.coder)
    cfg = ModelConfig.from_json(args.reference / "config.json")
    model = OSDiffModel.load(args.reference / "sd21_tiny.ckpt", args.reference / "osdiff_tiny.ckpt", cfg)
    codec = Codec(TorchBackend(model), max_pixels=256 * 256)
    t0 = time.perf_counter()
    outcomes = fuzz(codec, tiny_streams(codec), args.cases, args.seed)
    for key, count in sorted(outcomes.items()):
        print(f"{count:>9}  {key}")
    print(f"{args.cases} cases in {time.perf_counter() - t0:.0f} s with the {args.coder} coder: "
          "no crash, no hang, only StreamError")


if __name__ == "__main__":
    main()
