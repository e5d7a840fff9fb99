"""`osdiff compare`: the TensorRT engines against ONNX Runtime on the exported fp32 ONNX, graph by
graph, with Polygraphy's Comparator.

The TensorRT side runs through TensorRTBackend, the code the codec uses (shared scratch memory,
per-size buffers, profile choice), not through Polygraphy's own TrtRunner, so that a pass vouches
for what `osdiff decompress --backend tensorrt` runs. Each graph gets seeded random inputs at one
image size; each output gets Polygraphy's error statistics (its mean error is checked against
atol/rtol) and its PSNR, with the peak taken as the largest value of the ONNX Runtime output.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator, PsnrCompareFunc, SimpleCompareFunc

from osdiff.engine.profiles import Dims, ImageSize, resolve
from osdiff.runtime.backends.base import Backend
from osdiff.export.onnx_export import load_export
from osdiff.runtime.backends.tensorrt_backend import TensorRTBackend


class BackendRunner(BaseRunner):
    """A Polygraphy runner over one graph of an osdiff backend."""

    def __init__(self, backend: Backend, graph: str, inputs: list[str], outputs: list[str],
                 shapes: dict[str, Dims]) -> None:
        super().__init__(name=f"{backend.name}:{graph}")
        self.backend, self.graph, self.inputs, self.outputs, self.shapes = backend, graph, inputs, outputs, shapes

    def get_input_metadata_impl(self) -> TensorMetadata:
        meta = TensorMetadata()
        for name in self.inputs:
            meta.add(name, np.float32, self.shapes[name])
        return meta

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        t0 = time.perf_counter()
        outs = self.backend.run(self.graph, *(torch.from_numpy(feed_dict[n]) for n in self.inputs))
        result = OrderedDict((n, o.cpu().numpy()) for n, o in zip(self.outputs, outs))  # .cpu() waits for the GPU
        self.inference_time = time.perf_counter() - t0
        return result


def compare(engine_dir: str | Path, onnx_dir: str | Path, size: ImageSize, graphs: list[str] | None = None,
            min_psnr: float = 40.0, atol: float = 1e-2, rtol: float = 1e-2,
            echo: Callable[[str], None] = print) -> bool:
    """The engines of `engine_dir` against the export they were built from; True if all pass."""
    backend = TensorRTBackend(engine_dir)
    onnx_manifest, _ = load_export(onnx_dir)
    backend.manifest.check_export(engine_dir, onnx_dir, onnx_manifest)
    unknown = sorted(set(graphs or []) - set(backend.manifest.graphs))
    if unknown:
        raise ValueError(f"{engine_dir}: no engine for {', '.join(unknown)}")
    return compare_graphs(backend, onnx_dir, onnx_manifest, size, graphs or list(backend.manifest.graphs),
                          min_psnr, atol, rtol, echo)


def compare_graphs(backend: Backend, onnx_dir: str | Path, onnx_manifest: dict, size: ImageSize, graphs: list[str],
                   min_psnr: float, atol: float, rtol: float, echo: Callable[[str], None], seed: int = 0) -> bool:
    """Any backend against ONNX Runtime on the fp32 ONNX; prints a line per output."""
    generator = torch.Generator().manual_seed(seed)
    passed = True
    for name in graphs:
        entry = onnx_manifest["graphs"][name]
        shapes = entry["shapes"]
        feed = OrderedDict((n, torch.randn(resolve(shapes[n], size), generator=generator).numpy())
                           for n in entry["inputs"])
        runners = [OnnxrtRunner(SessionFromOnnx(str(Path(onnx_dir) / entry["fp32"]["file"]), providers=["cpu"])),
                   BackendRunner(backend, name, entry["inputs"], entry["outputs"], shapes)]
        results = Comparator.run(runners, data_loader=[feed])
        errors, psnrs = Comparator.compare_accuracy(results, compare_func=[
            SimpleCompareFunc(check_error_stat="mean", atol=atol, rtol=rtol), PsnrCompareFunc(psnr_threshold=min_psnr)])
        passed &= bool(errors) and bool(psnrs)
        (error,), (psnr,) = errors.values(), psnrs.values()  # one runner pair, one iteration
        for out in entry["outputs"]:
            e, p = error[0][out], psnr[0][out]
            echo(f"{name}.{out}: max |err| {e.max_absdiff:.3g}, mean |err| {e.mean_absdiff:.3g}, "
                 f"PSNR {p.psnr:.1f} dB  {'ok' if e and p else 'FAIL'}")
    return passed
