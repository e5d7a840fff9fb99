"""Timing spans for the profiler: named regions of the pipeline, measured honestly.

On the CPU a span is perf_counter around the region. On a CUDA device a span records CUDA
events on the stream the work is enqueued on (the current stream), so GPU time is measured
where it happens and nothing is synchronized inside the pipeline; `Trace.spans()` synchronizes
once and resolves the events. Each span is also an NVTX range, so Nsight shows the same names.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class Span:
    name: str
    start_ms: float
    duration_ms: float


class Trace:
    """on_start: called with a span's name as the span begins (on the CPU, when its work is
    issued), e.g. to show which stage a long run is in."""

    def __init__(self, device: torch.device | str = "cpu", enabled: bool = True,
                 on_start: Callable[[str], None] | None = None) -> None:
        self.device = torch.device(device)
        self.enabled = enabled
        self.on_start = on_start
        self.cuda = self.enabled and self.device.type == "cuda"
        self._cpu: list[tuple[str, float, float]] = []
        self._gpu: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._origin_cpu = time.perf_counter()
        self._origin_gpu: torch.cuda.Event | None = None
        if self.cuda:
            self._origin_gpu = torch.cuda.Event(enable_timing=True)
            self._origin_gpu.record()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.on_start is not None:
            self.on_start(name)
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.nvtx.range_push(name)
            start.record()
            try:
                yield
            finally:
                end.record()
                torch.cuda.nvtx.range_pop()
                self._gpu.append((name, start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._cpu.append((name, t0, time.perf_counter()))

    def spans(self) -> list[Span]:
        out = [Span(n, (a - self._origin_cpu) * 1e3, (b - a) * 1e3) for n, a, b in self._cpu]
        if self._gpu:
            torch.cuda.synchronize(self.device)
            assert self._origin_gpu is not None
            out += [Span(n, self._origin_gpu.elapsed_time(a), a.elapsed_time(b)) for n, a, b in self._gpu]
        return sorted(out, key=lambda s: s.start_ms)


NO_TRACE = Trace(enabled=False)


ENTROPY_PARTS = ("network", "index", "coder")


def stage_of(span_name: str) -> str:
    """The per-stage bucket of a span: the entropy rounds' spans (`slice3.anchor.coder`, ...) are
    summed into network, index/conversion and coder time, everything else is its own stage."""
    part = span_name.rsplit(".", 1)[-1]
    return f"entropy {part}" if "." in span_name and part in ENTROPY_PARTS else span_name


def per_stage(spans: list[Span], bucket: bool = True) -> dict[str, float]:
    """Total milliseconds per stage (per span name with bucket=False), in pipeline order."""
    out: dict[str, float] = {}
    for s in spans:
        key = stage_of(s.name) if bucket else s.name
        out[key] = out.get(key, 0.0) + s.duration_ms
    return out
