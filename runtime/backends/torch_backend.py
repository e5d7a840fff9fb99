"""The PyTorch backend: the reference modules themselves, on CPU or CUDA.

On CUDA the heavy stages (VAE, G_s, denoiser) can run in fp16 and channels_last, and every
graph can be captured into a CUDA graph per input shape, which removes the launch gaps of
its hundreds of small kernels (the twenty entropy-parameter graphs run once per round of every
image). All captures share one memory pool: graphs run one at a time and their outputs are
copied out at once, so the pool is as large as the largest graph, not the sum of all.

The entropy-model graphs (analysis, hyper synthesis, the entropy parameters) always run in
true fp32, whatever the precision of the others: cuDNN's TF32 convolutions (PyTorch's default on
Ampere and later) are off for them, and its algorithms deterministic. A CDF index that differs
from the encoder's loses the stream; TF32 moves scales by ~1e-3 where fp32 moves them by ulps.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from osdiff.calibration.precision import FP16_GRAPHS
from osdiff.export.model import OSDiffModel


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[Tensor]
    outputs: tuple[Tensor, ...]


class TorchBackend:
    """Runs the model's graphs. It moves the model's stages to `device` (and casts the heavy
    ones to fp16 with `half`) in place rather than copying 4 GB: give each backend its own
    OSDiffModel unless they share device and precision."""

    name = "torch"

    def __init__(self, model: OSDiffModel, device: str | torch.device = "cpu", half: bool = False,
                 channels_last: bool = False, cuda_graphs: bool = False, compile: bool = False,
                 compile_mode: str = "max-autotune") -> None:
        """compile: torch.compile the heavy stages with `compile_mode`. Modes that make CUDA
        graphs of their own ("reduce-overhead", "max-autotune") replace ours for those stages;
        with the others ("default", "max-autotune-no-cudagraphs") and cuda_graphs, ours
        capture the compiled stages."""
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("no CUDA device here (torch.cuda.is_available() is False)")
        if (half or cuda_graphs or compile or channels_last) and self.device.type != "cuda":
            raise ValueError("fp16, channels_last, CUDA graphs and torch.compile are offered on CUDA only")
        self.models = model.entropy_models
        self.cuda_graphs = cuda_graphs
        self.graphs = model.graphs()
        self._dtype: dict[str, torch.dtype] = {}
        self._layout: dict[str, torch.memory_format] = {}
        self._module: dict[str, nn.Module] = {}
        self._compiled: set[str] = set()
        self._captured: dict[tuple, _Captured] = {}
        self._pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        self._graph_lock = threading.Lock()
        self._stream = torch.cuda.Stream(self.device) if cuda_graphs else None
        for module in model.stages.values():
            module.to(self.device)
        for name, g in self.graphs.items():
            heavy = name in FP16_GRAPHS
            self._dtype[name] = torch.float16 if (half and heavy) else torch.float32
            self._layout[name] = torch.channels_last if (channels_last and heavy) else torch.contiguous_format
            if heavy:
                g.module.to(dtype=self._dtype[name], memory_format=self._layout[name])
            self._module[name] = g.module
            if compile and heavy:
                self._module[name] = torch.compile(g.module, mode=compile_mode)
                if compile_mode in ("reduce-overhead", "max-autotune"):
                    self._compiled.add(name)  # inductor's own CUDA graphs, not ours

    @torch.inference_mode()
    def run(self, graph: str, *inputs: Tensor) -> tuple[Tensor, ...]:
        dtype, layout = self._dtype[graph], self._layout[graph]
        xs = [x.to(self.device, dtype).contiguous(memory_format=layout) for x in inputs]
        with self._precision(graph):
            if self.cuda_graphs and graph not in self._compiled:
                assert self._stream is not None
                caller = torch.cuda.current_stream(self.device)
                with self._graph_lock:
                    self._stream.wait_stream(caller)  # the inputs were written on the caller's stream
                    with torch.cuda.stream(self._stream):
                        out = self._replay(graph, xs)
                caller.wait_stream(self._stream)
                for o in out:  # made on the backend's stream, read on the caller's
                    o.record_stream(caller)
            else:
                out = self._forward(graph, xs)
        return tuple(o.float() for o in out)

    def _precision(self, graph: str) -> AbstractContextManager:
        """True fp32 for the entropy-model graphs on CUDA (see the module's docstring). The flags
        are read when kernels are chosen, so they also hold inside a captured graph."""
        if self.device.type != "cuda" or graph in FP16_GRAPHS:
            return nullcontext()
        return torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False)

    def _forward(self, graph: str, xs: list[Tensor]) -> tuple[Tensor, ...]:
        out = self._module[graph](*xs)
        return out if isinstance(out, tuple) else (out,)

    def _replay(self, graph: str, xs: list[Tensor]) -> tuple[Tensor, ...]:
        key = (graph, tuple(x.shape for x in xs))
        cap = self._captured.get(key)
        if cap is None:
            static = [x.clone() for x in xs]
            # warm up on a side stream first: lazy initialization and cuDNN's algorithm search
            # must not happen inside the capture
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(graph, static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool):
                outputs = self._forward(graph, static)
            cap = self._captured[key] = _Captured(g, static, outputs)
        for dst, src in zip(cap.inputs, xs):
            dst.copy_(src)
        cap.graph.replay()
        # the next replay overwrites the static outputs: hand out copies
        return tuple(o.clone() for o in cap.outputs)
