"""The TensorRT backend: the engines of an `osdiff build` directory, kept on one CUDA device.

Loading checks the engines against this machine and model (engine/manifest.py: a mismatch names
the `osdiff build` command that rebuilds them) and deserializes every engine once.

Memory. Every execution context is created with ExecutionContextAllocationStrategy.USER_MANAGED
and handed the same device block (set_device_memory), sized by the largest
ICudaEngine.device_memory_size_v2: the graphs run one after another on one stream, so no two need
their scratch at once. I/O buffers are float32 CUDA tensors, allocated once per graph and padded
image size (GraphEngine) and bound with set_tensor_address. `run` copies its inputs into them and
returns device copies of the output buffers (see Threads): they stay on the device (between
entropy rounds the latent codec moves only uint8 indexes and integer symbols across the bus).

Contexts. One per graph and optimization profile, made on first use, because each execution
context in concurrent use must have an optimization profile of its own; a context is switched
between the image sizes of its profile with set_input_shape (and the buffers of that size with
set_tensor_address). The profile is the first in the manifest whose range holds the size.

Streams. TensorRT runs on the backend's own CUDA stream (execute_async_v3 on the default stream
costs extra synchronization); it waits for the caller's stream before reading inputs, and the
caller's stream waits for it before reading outputs. Nothing synchronizes the host.

Threads. The backend may be shared: `run` and `decode_tail` take one lock, so contexts, bound
buffers, the shared scratch block and the captured graphs are used by one thread at a time (the
graphs run one after another on the backend's stream anyway), and they hand out copies of the
output buffers, made on that stream before the lock is released, so that another thread's run
cannot overwrite what a caller is still reading.

CUDA graphs (`decode_tail`). synthesis -> denoiser -> vae_decoder is captured into one CUDA graph
per image size with torch.cuda.graph around execute_async_v3, under the conditions TensorRT
documents for capturing enqueue:
- capture only after the contexts have run once at that size: the first enqueue after an input
  shape change does setup work that cannot be captured;
- capture and replay on a non-default stream (the backend's stream);
- the graph bakes in the input shapes and every device address (the I/O buffers of that size and
  the shared scratch block), so those must never move: buffers are allocated once per size and the
  block once;
- a context set to another size since the capture invalidates the graph (its state is no longer
  the captured one): each GraphEngine counts its rebinds and a stale graph is captured again;
- the engines may contain no loops, conditionals or data-dependent shapes (ours have none).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from osdiff.engine.environment import current_gpu, tensorrt_version
from osdiff.engine.manifest import MODEL_DIR, EngineError, EngineManifest
from osdiff.engine.profiles import ImageSize, ShapeProfile, image_size, resolve
from osdiff.export.onnx_export import load_export

if TYPE_CHECKING:
    import tensorrt as trt

DECODE_TAIL = ("synthesis", "denoiser", "vae_decoder")


class Context(Protocol):
    """What GraphEngine asks of a tensorrt.IExecutionContext (a protocol, so that its bookkeeping
    can be unit-tested with a recording double where TensorRT is absent)."""

    def set_input_shape(self, name: str, shape: tuple) -> bool: ...

    def set_tensor_address(self, name: str, memory: int) -> bool: ...

    def execute_async_v3(self, stream_handle: int) -> bool: ...


@dataclass
class Binding:
    """The I/O buffers of one graph at one image size."""

    size: ImageSize
    profile: int
    inputs: list[Tensor]
    outputs: list[Tensor]


class GraphEngine:
    """One graph's engine: its execution contexts (one per profile) and its buffers (one set per
    image size), and which size each context is currently set to."""

    def __init__(self, name: str, manifest: EngineManifest, directory: Path,
                 new_context: Callable[[int], Context], device: torch.device) -> None:
        entry = manifest.graphs[name]
        self.name, self.manifest, self.directory = name, manifest, directory
        self.inputs: list[str] = entry["inputs"]
        self.outputs: list[str] = entry["outputs"]
        self.shapes = entry["shapes"]
        self.profiles = manifest.shape_profiles()
        self.new_context, self.device = new_context, device
        self.contexts: dict[int, Context] = {}
        self.bindings: dict[ImageSize, Binding] = {}
        self.bound: dict[int, ImageSize] = {}  # profile -> the size its context is set to
        self.rebinds = 0

    def binding(self, inputs: Sequence[Tensor]) -> Binding:
        if len(inputs) != len(self.inputs):
            raise ValueError(f"{self.name} takes {len(self.inputs)} inputs ({', '.join(self.inputs)}), "
                             f"got {len(inputs)}")
        size = image_size(self.shapes, {n: tuple(x.shape) for n, x in zip(self.inputs, inputs)})
        if size not in self.bindings:
            profile = next((i for i, p in enumerate(self.profiles) if p.covers(size)), None)
            if profile is None:
                command = self.manifest.rebuild_command(self.directory, extra_profile=ShapeProfile.exact(size))
                raise EngineError(f"{self.directory}: no optimization profile ({', '.join(self.manifest.profiles)}) "
                                  f"holds images of {size}; rebuild with one that does: {command}")

            def buffers(names: list[str]) -> list[Tensor]:
                return [torch.empty(resolve(self.shapes[n], size), dtype=torch.float32, device=self.device)
                        for n in names]

            self.bindings[size] = Binding(size, profile, buffers(self.inputs), buffers(self.outputs))
        return self.bindings[size]

    def enqueue(self, b: Binding, stream: int) -> None:
        if b.profile not in self.contexts:
            self.contexts[b.profile] = self.new_context(b.profile)
        context = self.contexts[b.profile]
        if self.bound.get(b.profile) != b.size:
            for name, buf in zip(self.inputs, b.inputs):
                if not context.set_input_shape(name, tuple(buf.shape)):
                    raise EngineError(f"{self.name}: TensorRT refused the shape {tuple(buf.shape)} for {name}")
            for name, buf in zip(self.inputs + self.outputs, b.inputs + b.outputs):
                if not context.set_tensor_address(name, buf.data_ptr()):
                    raise EngineError(f"{self.name}: TensorRT refused the buffer of {name}")
            self.bound[b.profile] = b.size
            self.rebinds += 1
        if not context.execute_async_v3(stream):
            raise EngineError(f"{self.name}: TensorRT could not run the engine (its log above says why)")


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, directory: str | Path, device: str | torch.device = "cuda") -> None:
        self.directory = Path(directory)
        self.device = torch.device(device)
        self.manifest = EngineManifest.read(self.directory)
        self.manifest.check_machine(self.directory, tensorrt_version(), current_gpu(self.device))
        _, self.models = load_export(self.directory / MODEL_DIR)
        self.manifest.check_model(self.directory, self.models.fingerprint.hex())
        import tensorrt as trt

        # The logger and the runtime must outlive the engines made with them.
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engines = {name: self._deserialize(name) for name in self.manifest.graphs}
            self.stream = torch.cuda.Stream(self.device)
            self.scratch = torch.empty(max(e.device_memory_size_v2 for e in self.engines.values()),
                                       dtype=torch.uint8, device=self.device)  # torch aligns to 512 bytes
        self.graphs = {name: GraphEngine(name, self.manifest, self.directory, partial(self._new_context, engine),
                                         self.device) for name, engine in self.engines.items()}
        self._tails: dict[ImageSize, tuple[torch.cuda.CUDAGraph, tuple[int, ...]]] = {}
        self._lock = threading.Lock()

    def _deserialize(self, name: str) -> "trt.ICudaEngine":
        import tensorrt as trt

        entry = self.manifest.graphs[name]
        path = self.directory / entry["engine"]
        command = self.manifest.rebuild_command(self.directory)
        try:
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        except OSError as e:
            raise EngineError(f"{path}: cannot read it ({e}); rebuild the engines: {command}") from e
        if engine is None:
            raise EngineError(f"{path}: TensorRT cannot deserialize it (its log above says why); rebuild: {command}")
        for io in entry["inputs"] + entry["outputs"]:
            if engine.get_tensor_dtype(io) != trt.DataType.FLOAT:
                raise EngineError(f"{path}: {io} is not float32 (the export gives every graph float32 I/O); "
                                  f"rebuild: {command}")
        return engine

    def _new_context(self, engine: "trt.ICudaEngine", profile: int) -> "trt.IExecutionContext":
        import tensorrt as trt

        context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise EngineError("TensorRT could not create an execution context (its log above says why)")
        context.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
        if not context.set_optimization_profile_async(profile, self.stream.cuda_stream):
            raise EngineError(f"TensorRT could not select optimization profile {profile}")
        return context

    def _graph(self, name: str) -> GraphEngine:
        if name not in self.graphs:
            raise EngineError(f"{self.directory}: no engine for graph {name!r}")
        return self.graphs[name]

    @contextlib.contextmanager
    def _on_stream(self) -> Iterator[torch.cuda.Stream]:
        """Under the backend's lock, on its stream; yields the caller's stream."""
        with self._lock:
            caller = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(caller)  # the inputs were written on the caller's stream
            with torch.cuda.stream(self.stream):
                yield caller
            caller.wait_stream(self.stream)  # the caller reads the outputs on its stream

    @staticmethod
    def _copies(buffers: Sequence[Tensor], caller: torch.cuda.Stream) -> tuple[Tensor, ...]:
        out = tuple(b.clone() for b in buffers)  # on the backend's stream, ordered after the run
        for o in out:
            o.record_stream(caller)  # freed memory is not reused before the caller is done
        return out

    def run(self, graph: str, *inputs: Tensor) -> tuple[Tensor, ...]:
        engine = self._graph(graph)
        with self._on_stream() as caller:
            b = engine.binding(inputs)
            for buf, x in zip(b.inputs, inputs):
                buf.copy_(x)
            engine.enqueue(b, self.stream.cuda_stream)
            return self._copies(b.outputs, caller)

    def decode_tail(self, y_hat: Tensor, x_T: Tensor) -> Tensor:
        """synthesis -> denoiser -> vae_decoder as one CUDA graph per image size (see the module
        docstring); returns the decoder's output buffer."""
        synthesis, denoiser, decoder = (self._graph(n) for n in DECODE_TAIL)
        with self._on_stream() as caller:
            chain = [synthesis.binding([y_hat])]
            chain.append(denoiser.binding([chain[0].outputs[0], x_T]))
            chain.append(decoder.binding(chain[1].outputs))
            size = chain[0].size
            chain[0].inputs[0].copy_(y_hat)
            chain[1].inputs[1].copy_(x_T)
            captured = self._tails.get(size)
            if captured is not None and captured[1] == self._rebinds():
                captured[0].replay()
            else:
                self._enqueue_tail(chain)  # the ordinary run both decodes and prepares the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    self._enqueue_tail(chain)
                self._tails[size] = (graph, self._rebinds())
            return self._copies(chain[2].outputs, caller)[0]

    def _enqueue_tail(self, chain: list[Binding]) -> None:
        stream = self.stream.cuda_stream
        for i, name in enumerate(DECODE_TAIL):
            if i:
                chain[i].inputs[0].copy_(chain[i - 1].outputs[0])
            self.graphs[name].enqueue(chain[i], stream)

    def _rebinds(self) -> tuple[int, ...]:
        return tuple(self.graphs[n].rebinds for n in DECODE_TAIL)
