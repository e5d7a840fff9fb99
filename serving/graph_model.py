"""A Python-backend model that runs one ONNX graph with ONNX Runtime on the CPU: the graph
models of a repository written with `osdiff triton-repo --python-only`, for tritonservers that
have Triton's Python backend but not its onnxruntime backend (PyTriton's, for one).

Imports no torch: one such process runs per model instance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from osdiff.runtime.backends.onnxruntime_int8 import inference_session


class OnnxGraphModel:
    """Triton's TritonPythonModel interface; inputs and outputs as in the model's config.pbtxt."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        self.outputs = [o["name"] for o in config["output"]]
        options = ort.SessionOptions()
        # OnnxRuntimeBackend's options: the in-process codec and this model compute the same bits
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        # an INT8 graph with uint8 activations, as OnnxRuntimeBackend loads it
        self.session = inference_session(path, options, ["CPUExecutionProvider"])

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                feed = {t.name(): np.ascontiguousarray(t.as_numpy(), np.float32) for t in request.inputs()}
                results = self.session.run(self.outputs, feed)
                responses.append(self.pb.InferenceResponse([self.pb.Tensor(n, r) for n, r in zip(self.outputs, results)]))
            except Exception as e:
                responses.append(self.pb.InferenceResponse(error=self.pb.TritonError(f"{type(e).__name__}: {e}")))
        return responses
