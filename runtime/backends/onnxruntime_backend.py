"""The ONNX Runtime backend: the exported graphs of an `osdiff export` directory.

CPU execution provider by default (it is what CI and the CPU machines have); the CUDA and
TensorRT execution providers are selected with `providers=` where onnxruntime-gpu finds them.
Sessions are created lazily, on a graph's first run, so a decoder never pays for the encoder's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import load_file
from torch import Tensor

from osdiff.config import ModelConfig
from osdiff.export.onnx_export import FORMAT, FORMAT_VERSION
from osdiff.runtime.backends.base import EntropyModels
from osdiff.runtime.entropy import EntropyBottleneck, GaussianConditional

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class ExportError(ValueError):
    """An export directory is missing, incomplete, or does not match this build."""


def load_export(directory: str | Path) -> tuple[dict, EntropyModels]:
    """Read and check an export directory's manifest; rebuild the entropy models from it."""
    d = Path(directory)
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{d}: not an osdiff export directory (no readable manifest.json): {e}") from e
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{d}: manifest format {manifest.get('format')} v{manifest.get('format_version')} "
                          f"is not {FORMAT} v{FORMAT_VERSION}; re-export with `osdiff export`")
    cfg = ModelConfig.from_dict(manifest["model"]["config"])
    ent = manifest["entropy"]
    eb = EntropyBottleneck(load_file(str(d / ent["bottleneck"]["params_file"])), cfg.entropy.precision)
    if eb.tables.cdfs != ent["bottleneck"]["cdfs"] or eb.tables.offsets != ent["bottleneck"]["offsets"]:
        raise ExportError(f"{d}: the entropy bottleneck tables in manifest.json do not match its parameters")
    models = EntropyModels(cfg, eb, GaussianConditional(cfg.entropy), bytes.fromhex(manifest["model"]["fingerprint"]))
    return manifest, models


class OnnxRuntimeBackend:
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
        self.providers = PROVIDERS[provider]
        self.device = torch.device("cpu")  # I/O through host memory; see the module docstring
        self.options = ort.SessionOptions()
        self.options.log_severity_level = 3
        # ORT's worker threads spin after each run by default; between the twenty small
        # entropy graphs that spinning starves the coder and the index code of the CPU.
        self.options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            self.options.intra_op_num_threads = threads
        self._sessions: dict[str, ort.InferenceSession] = {}

    def session(self, graph: str) -> ort.InferenceSession:
        if graph not in self._sessions:
            entry = self.manifest["graphs"].get(graph)
            if entry is None:
                raise ExportError(f"{self.directory}: graph {graph!r} was not exported")
            variant = entry.get(self.precision, entry["fp32"])
            path = self.directory / variant["file"]
            if not path.exists():
                raise ExportError(f"{path}: missing; re-run `osdiff export`")
            self._sessions[graph] = ort.InferenceSession(str(path), self.options, providers=self.providers)
        return self._sessions[graph]

    def run(self, graph: str, *inputs: Tensor) -> tuple[Tensor, ...]:
        s = self.session(graph)
        feed = {i.name: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32) for i, x in zip(s.get_inputs(), inputs)}
        return tuple(torch.from_numpy(o) for o in s.run(None, feed))
