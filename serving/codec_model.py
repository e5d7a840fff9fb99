"""The Python-backend model behind `osdiff_compress` and `osdiff_decompress` in a repository
written by `osdiff triton-repo` (serving/repository.py): a Codec whose backend runs the heavy
graphs as requests to the repository's graph models (Triton's BLS: business-logic scripting)
and the entropy-model graphs itself, with ONNX Runtime on this CPU instance.

Runs inside tritonserver's Python-backend stub, which provides `triton_python_backend_utils`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from osdiff.runtime.codec import Codec
from osdiff.serving.models import COMPRESS, CodecModels, error_report

EXPORT_DIR = "export"  # beside model.py: see serving/repository.py


class BlsBackend:
    """A backend (runtime/backends/base.py) for a codec inside Triton: the graphs in `remote`
    are inference requests to the models `osdiff_<graph>` of the same server, the others run in
    ONNX Runtime on the CPU from `export_dir` (which holds the export's manifest and those graphs)."""

    name = "triton-bls"

    def __init__(self, export_dir: Path, remote: list[str], pb_utils: Any) -> None:
        self.local = OnnxRuntimeBackend(export_dir)
        self.models = self.local.models
        self.device = torch.device("cpu")
        self.remote = set(remote)
        self.pb = pb_utils

    def run(self, graph: str, *inputs: Tensor) -> tuple[Tensor, ...]:
        if graph not in self.remote:
            return self.local.run(graph, *inputs)
        entry = self.local.manifest["graphs"][graph]
        request = self.pb.InferenceRequest(
            model_name=f"osdiff_{graph}", requested_output_names=list(entry["outputs"]),
            inputs=[self.pb.Tensor(n, np.ascontiguousarray(x.numpy(), np.float32)) for n, x in zip(entry["inputs"], inputs)],
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"osdiff_{graph}: {response.error().message()}")
        return tuple(torch.from_numpy(self.pb.get_output_tensor_by_name(response, n).as_numpy().copy()) for n in entry["outputs"])


class CodecModel:
    """Triton's TritonPythonModel interface. Every request is answered on its own: a bad one
    gets an error response naming the problem (INVALID_ARG: HTTP 400, gRPC INVALID_ARGUMENT),
    a failure of the server INTERNAL with an incident id (serving/models.py `error_report`); the
    others in the same call are unaffected."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        remote = config["parameters"]["remote_graphs"]["string_value"]
        folder = Path(args["model_repository"]) / args["model_version"]
        backend = BlsBackend(folder / EXPORT_DIR, [g for g in remote.split(",") if g], pb_utils)
        models = CodecModels(Codec(backend), batched=False)
        self.method = models.compress if config["name"] == COMPRESS else models.decompress

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            inputs = {t.name(): t.as_numpy() for t in request.inputs()}
            try:
                (outputs,) = self.method([inputs])
                responses.append(self.pb.InferenceResponse([self.pb.Tensor(k, v) for k, v in outputs.items()]))
            except Exception as e:
                report = error_report(e)
                code = getattr(self.pb.TritonError, report["code"])
                responses.append(self.pb.InferenceResponse(error=self.pb.TritonError(report["message"], code)))
        return responses
