"""Per-stage latency of the codec, measured the honest way.

End to end means bytes in to pixels out: encode times a uint8 image in host memory to .osd
bytes, decode times .osd bytes to a uint8 image in host memory, both after synchronizing the
device. Stages are the spans of runtime/profiling.Trace (CUDA events on the stream the work
runs on, perf_counter on the CPU). Each run's spans are summed per stage; the report gives
the median, 90th percentile and minimum over the runs.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from osdiff.runtime.codec import Codec
from osdiff.runtime.profiling import NO_TRACE, Span, Trace, per_stage


@dataclass
class Stats:
    median: float
    p90: float
    min: float

    @staticmethod
    def of(values: list[float]) -> "Stats":
        a = np.asarray(values, dtype=np.float64)
        return Stats(float(np.median(a)), float(np.percentile(a, 90)), float(a.min()))


@dataclass
class Profile:
    backend: str
    device: str
    batch: int
    height: int
    width: int
    runs: int
    stream_bytes: int
    bpp: float
    encode: Stats
    decode: Stats
    encode_stages: dict[str, Stats]
    decode_stages: dict[str, Stats]
    host_peak_mb: float
    device_peak_mb: float | None
    last_spans: dict[str, list[Span]] = field(default_factory=dict)

    def table(self) -> str:
        rows = [f"{self.backend} on {self.device}, batch {self.batch}, {self.height}x{self.width}, "
                f"{self.runs} runs, {self.stream_bytes} bytes/image ({self.bpp:.4f} bpp)",
                f"{'stage':<30}{'median ms':>11}{'p90 ms':>10}{'min ms':>10}"]
        for title, total, stages in (("encode", self.encode, self.encode_stages), ("decode", self.decode, self.decode_stages)):
            rows.append(f"{title + ' (bytes/pixels, synchronized)':<30}{total.median:>11.2f}{total.p90:>10.2f}{total.min:>10.2f}")
            for name, s in stages.items():
                rows.append(f"  {name:<28}{s.median:>11.2f}{s.p90:>10.2f}{s.min:>10.2f}")
        rows.append(f"peak host memory {self.host_peak_mb:.0f} MB"
                    + (f", peak device memory {self.device_peak_mb:.0f} MB" if self.device_peak_mb is not None else ""))
        return "\n".join(rows)

    def to_json(self) -> dict:
        def stats(s: Stats) -> dict:
            return {"median_ms": s.median, "p90_ms": s.p90, "min_ms": s.min}

        return {
            "backend": self.backend, "device": self.device, "batch": self.batch, "height": self.height,
            "width": self.width, "runs": self.runs, "stream_bytes": self.stream_bytes, "bpp": self.bpp,
            "encode": stats(self.encode), "decode": stats(self.decode),
            "encode_stages": {k: stats(v) for k, v in self.encode_stages.items()},
            "decode_stages": {k: stats(v) for k, v in self.decode_stages.items()},
            "host_peak_mb": self.host_peak_mb, "device_peak_mb": self.device_peak_mb,
        }

    def chrome_trace(self) -> dict:
        """The last encode and decode as Chrome trace events (open in Perfetto / chrome://tracing)."""
        events = []
        for tid, (name, spans) in enumerate(self.last_spans.items()):
            events.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}})
            events += [{"name": s.name, "ph": "X", "pid": 1, "tid": tid, "ts": s.start_ms * 1e3, "dur": s.duration_ms * 1e3}
                       for s in spans]
        return {"traceEvents": events, "displayTimeUnit": "ms"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile(codec: Codec, images: list[np.ndarray], warmup: int = 5, runs: int = 50, backend_name: str = "",
            on_stage: Callable[[str], None] | None = None, on_run: Callable[[], None] | None = None) -> Profile:
    """A first compress and `warmup` round trips, untimed, then `runs` timed round trips.
    on_stage: called with each span's name as it starts; on_run: after the first compress and
    after each round trip (a progress display)."""
    device = codec.backend.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    done = on_run or (lambda: None)
    streams = codec.compress_batch(images, trace=Trace(on_start=on_stage) if on_stage else NO_TRACE)
    done()
    for _ in range(warmup):
        warm = Trace(on_start=on_stage) if on_stage else NO_TRACE
        codec.decompress_batch(codec.compress_batch(images, trace=warm), trace=warm)
        done()
    enc_total, dec_total = [], []
    enc_stages: list[dict[str, float]] = []
    dec_stages: list[dict[str, float]] = []
    last: dict[str, list[Span]] = {}
    for _ in range(runs):
        trace = Trace(device, on_start=on_stage)
        _sync(device)
        t0 = time.perf_counter()
        streams = codec.compress_batch(images, trace=trace)
        _sync(device)
        enc_total.append((time.perf_counter() - t0) * 1e3)
        last["encode"] = trace.spans()
        enc_stages.append(per_stage(last["encode"], bucket=False))

        trace = Trace(device, on_start=on_stage)
        _sync(device)
        t0 = time.perf_counter()
        codec.decompress_batch(streams, trace=trace)
        _sync(device)
        dec_total.append((time.perf_counter() - t0) * 1e3)
        last["decode"] = trace.spans()
        dec_stages.append(per_stage(last["decode"], bucket=False))
        done()

    def collect(per_run: list[dict[str, float]]) -> dict[str, Stats]:
        names = list(per_run[0])
        return {n: Stats.of([r.get(n, 0.0) for r in per_run]) for n in names}

    h, w = images[0].shape[:2]
    nbytes = int(np.mean([len(s) for s in streams]))
    return Profile(
        backend=backend_name or codec.backend.name, device=str(device), batch=len(images), height=h, width=w,
        runs=runs, stream_bytes=nbytes, bpp=nbytes * 8 / (h * w),
        encode=Stats.of(enc_total), decode=Stats.of(dec_total),
        encode_stages=collect(enc_stages), decode_stages=collect(dec_stages),
        host_peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        device_peak_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        last_spans=last,
    )
