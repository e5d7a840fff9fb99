"""The ONNX Runtime backend: the exported graphs of an `osdiff export` directory.

CPU execution provider by default (it is what CI and the CPU machines have); the CUDA and
TensorRT execution providers are selected with `providers=` where onnxruntime-gpu finds them.
Sessions are created lazily, on a graph's first run, so a decoder never pays for the encoder's.

Threads: the backend may be shared. InferenceSession.run is thread-safe (ONNX Runtime documents
it); session creation takes a lock, so two threads never load the same graph twice.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from osdiff.calibration.precision import fp32_by_design
from osdiff.export.onnx_export import ExportError, load_export
from osdiff.runtime.backends.onnxruntime_int8 import inference_session

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


_arena_lock = threading.Lock()
_arena_shared = False
# The largest activation peak (bytes, as runtime/memory.py estimates it) of a run this process
# has started on the shared arena, which keeps at least that much for the runs after it
_arena_peak = 0


def _share_cpu_arena() -> None:
    """Registers one CPU arena in ONNX Runtime's environment, once per process, for sessions
    that ask for it. By default every session has its own arena, which keeps the largest
    activations that session ever held: a process running every stage then holds all their
    peaks at once (a 1 MP demo-config compress + decompress, twice: 4.4 GB; with one shared
    arena 1.06 GB, the peak of one stage, and no slower). Without any arena the buffers go back
    to the system after each run and the page faults of the next made ORT 2 to 2.5 times slower
    here. The arena grows in powers of two (ORT's default, kNextPowerOfTwo): growing by exactly
    what is requested (kSameAsRequested) left it fragmented when a decompress ran alone in a
    fresh process, the demo config's 1 MP decompress peaking at 1.55 GiB against 1.11 GiB this
    way (benchmarks/memory.py, both measured side by side; compress 1.03 and 1.05 GiB)."""
    global _arena_shared
    with _arena_lock:
        if not _arena_shared:
            cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(cpu, ort.OrtArenaCfg({"arena_extend_strategy": 0}))  # kNextPowerOfTwo
            _arena_shared = True


# How to get a precision's variants into an export (osdiff export's flags)
_EXPORT_HINT = {"fp16": "re-export the model: `osdiff export` writes them unless --no-fp16 is given",
                "int8": "`osdiff calibrate --engines DIR --precision int8` (and the model: --config, or its "
                        "checkpoints) adds them to an export"}


def graph_variants(directory: str | Path, manifest: dict, precision: str) -> dict[str, dict]:
    """The manifest entry ({"file", "sha256"}) of the variant each graph of an export runs in
    at `precision`: its variant of that precision, else fp32 for the graphs that are fp32 by
    design (calibration/precision.py: the LFGCM graphs). ExportError naming every other graph
    the export lacks in that precision, and how to export it: never a silent fp32 run."""
    variants, missing = {}, []
    for graph, entry in manifest["graphs"].items():
        if precision in entry:
            variants[graph] = entry[precision]
        elif fp32_by_design(graph) and "fp32" in entry:
            variants[graph] = entry["fp32"]
        else:
            missing.append(graph)
    if missing:
        how = _EXPORT_HINT.get(precision, f"export them in {precision} with `osdiff export`")
        raise ExportError(
            f"precision {precision}: the export in {directory} has no {precision} variant of "
            f"{', '.join(repr(g) for g in missing)}; {how}, or use --precision fp32. "
            "The LFGCM graphs (analysis, hyper_synthesis, entropy_*) are fp32 by design and run in fp32 at every precision")
    return variants


class OnnxRuntimeBackend:
    """precision: the variant of the heavy graphs to run ("fp32", "fp16", "int8"); the LFGCM graphs
    run fp32 whatever it is. ExportError at construction if the export lacks it for a graph."""

    name = "onnxruntime"

    def __init__(self, directory: str | Path, precision: str = "fp32", provider: str = "cpu",
                 threads: int | None = None) -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {sorted(PROVIDERS)}")
        missing = [p for p in PROVIDERS[provider][:-1] if p not in ort.get_available_providers()]
        if missing:
            raise RuntimeError(f"onnxruntime has no {missing[0]} here (available: {ort.get_available_providers()})")
        self.directory = Path(directory)
        self.manifest, self.models = load_export(self.directory)
        self.precision = precision
        self.variants = graph_variants(self.directory, self.manifest, precision)
        self.providers = PROVIDERS[provider]
        self.device = torch.device("cpu")  # I/O through host memory; see the module docstring
        self.options = ort.SessionOptions()
        self.options.log_severity_level = 3
        # ORT's worker threads spin after each run by default; between the twenty small
        # entropy graphs that spinning starves the coder and the index code of the CPU.
        self.options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # One CPU arena for every session (see _share_cpu_arena), allocating tensor by tensor
        # rather than one planned block per run, so that what one stage frees the next reuses.
        _share_cpu_arena()
        self.options.add_session_config_entry("session.use_env_allocators", "1")
        self.options.enable_mem_pattern = False
        if threads:
            self.options.intra_op_num_threads = threads
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._lock = threading.Lock()
        self.session_seconds = 0.0  # spent creating sessions so far (the first run of each graph pays it)

    def session(self, graph: str) -> ort.InferenceSession:
        session = self._sessions.get(graph)
        if session is not None:
            return session
        with self._lock:
            return self._create(graph)

    def _create(self, graph: str) -> ort.InferenceSession:
        if graph not in self._sessions:
            variant = self.variants.get(graph)
            if variant is None:
                raise ExportError(f"{self.directory}: graph {graph!r} was not exported")
            path = self.directory / variant["file"]
            if not path.exists():
                raise ExportError(f"{path}: missing; re-run `osdiff export`")
            t0 = time.perf_counter()
            # INT8 graphs run with uint8 activations on ORT's integer kernels (onnxruntime_int8.py)
            self._sessions[graph] = (inference_session(path, self.options, self.providers) if self.precision == "int8"
                                     else ort.InferenceSession(str(path), self.options, providers=self.providers))
            self.session_seconds += time.perf_counter() - t0
        return self._sessions[graph]

    def unloaded_bytes(self, decode: bool) -> int:
        """Bytes of the graph files a compress (decode=False) or decompress would still load."""
        encode_only = ("vae_encoder", "analysis")
        decode_only = ("synthesis", "denoiser", "vae_decoder")
        total = 0
        for name, variant in self.variants.items():
            if name in self._sessions or name in (encode_only if decode else decode_only):
                continue
            path = self.directory / variant["file"]
            for f in (path, path.with_name(path.name + ".data")):
                total += f.stat().st_size if f.exists() else 0
        return total

    def note_run_peak(self, peak: int) -> None:
        """A run whose estimated activation peak is `peak` bytes is about to start."""
        global _arena_peak
        if self.providers[0] != "CPUExecutionProvider":
            return  # the activations live in the device's arena
        with _arena_lock:
            _arena_peak = max(_arena_peak, peak)

    def arena_bytes(self) -> int:
        """Bytes the shared CPU arena holds from earlier runs (at least), which the next run
        reuses: the codec's memory estimate counts them once, in the process's resident
        memory, not again in the activations (it counted them twice: a second 4 MP image under
        --max-memory 6G was refused although it would take about 3 GiB). The arena keeps them
        because giving them back costs more: shrinking it after each run raised the peak
        of a 1 MP compress + decompress from 1.05 to 1.40 GiB here."""
        return _arena_peak

    def run(self, graph: str, *inputs: Tensor) -> tuple[Tensor, ...]:
        s = self.session(graph)
        feed = {i.name: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32) for i, x in zip(s.get_inputs(), inputs)}
        return tuple(torch.from_numpy(o) for o in s.run(None, feed))
