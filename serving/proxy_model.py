"""The Python-backend model of `osdiff serve`'s two models: PyTriton's proxy model (which hands
each batch of requests to the codec in the `osdiff serve` process) with error responses of our own.

PyTriton answers every failure of an inference callable by raising TritonModelException with
the callable's formatted traceback, which tritonserver sends to the client as HTTP 500 / gRPC
INTERNAL with two tracebacks naming files on the server. serving/server.py raises instead a
WireError whose message is one line, `osdiff-error {"code": ..., "message": ..., "request": ...}`;
this model finds that line in the exception and answers with Triton's per-request error
(pb_utils.TritonError with its code, which Triton maps to the HTTP status and gRPC code):

    INVALID_ARG  -> HTTP 400, gRPC INVALID_ARGUMENT  the request is bad (a client's fault)
    UNAVAILABLE  -> HTTP 503, gRPC UNAVAILABLE       batched with another client's bad request:
                                                     send it again
    INTERNAL     -> HTTP 500, gRPC INTERNAL          anything else; the full text goes to the
                                                     server's log only

serving/server.py copies this file into PyTriton's model store as `model.py`, beside PyTriton's
own proxy files, its model.py renamed `pytriton_model.py`. It runs inside tritonserver's
Python-backend stub, which provides `triton_python_backend_utils`; it imports nothing of osdiff.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

from .pytriton_model import TritonPythonModel as PyTritonModel  # type: ignore[import-not-found]

ERROR_LINE = re.compile(r"osdiff-error (\{.*\})")
BATCHED_WITH_BAD = "batched with another request that was bad; send it again"


class TritonPythonModel(PyTritonModel):  # type: ignore[misc]
    def execute(self, requests: list[Any]) -> list[Any]:
        try:
            return super().execute(requests)  # type: ignore[no-any-return]
        except pb_utils.TritonModelException as e:
            return error_responses(str(e), len(requests))


def error_responses(text: str, count: int) -> list[Any]:
    """One error response per request of the failed call, from the text of PyTriton's exception."""
    found = ERROR_LINE.findall(text)
    if not found:  # a failure of PyTriton's own, not of the codec: nothing of it goes to the client
        incident = uuid.uuid4().hex[:12]
        pb_utils.Logger.log_error(f"osdiff internal error {incident}: {text}")
        error = json.dumps({"code": "INTERNAL", "message": f"internal server error {incident} (details in the server's log)"})
        found = [error]
    report = json.loads(found[-1])
    bad = report.get("request")  # the request at fault (index in this call), or None: all of them
    # pb_utils gets TritonError from the stub once the model runs (not while Triton reads this file
    # to complete its config): looked up here, not at import
    own = pb_utils.TritonError(report["message"], getattr(pb_utils.TritonError, report["code"]))
    other = pb_utils.TritonError(BATCHED_WITH_BAD, pb_utils.TritonError.UNAVAILABLE)
    return [pb_utils.InferenceResponse(error=own if bad is None or i == bad else other) for i in range(count)]
