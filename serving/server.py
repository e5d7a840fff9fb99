"""`osdiff serve`: a Triton Inference Server in one command, through PyTriton.

PyTriton (the `nvidia-pytriton` wheel) ships a `tritonserver` binary and Triton's Python backend,
and runs the two models (serving/models.py) as Python callables in this process: Triton does
HTTP/gRPC, health, metrics, the request queue and the dynamic batcher, and hands each batch of
requests to one of the model's instances, each with a Codec of its own (a backend holds CUDA
streams and TensorRT contexts that one thread at a time may use).

Health: Triton's standard endpoints are to be trusted. The models are bound before tritonserver
starts, into PyTriton's local model store, and tritonserver loads them at start-up, so that
`/v2/health/ready` (and gRPC ServerReady) says ready only once both models are (PyTriton's default
starts an empty server and loads the models through its API afterwards: ready before they were).
`/v2/health/live` is liveness: the process runs (tritonserver dies with this process, and this
process stops when tritonserver or a model's handler dies). On SIGTERM tritonserver takes no
new connection (so readiness fails), answers the requests of the connections it has, and exits
once they are closed or after exit_timeout_s.

Errors: the proxy model of each model (serving/proxy_model.py, PyTriton's with error responses of
our own) turns a failed call into per-request errors with a status saying whose fault it is and a
message without traceback or server path (see serving/models.py).

PyTriton's Python-backend stub embeds the interpreter: it needs a shared libpython of exactly
this Python (see `prepare_environment`) and numpy < 2 (the `serve` extra pins it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from osdiff.runtime.codec import Codec
from osdiff.serving.models import COMPRESS, DECOMPRESS, INPUTS, OUTPUTS, CodecModels, TensorSpec, error_report


class ServeError(RuntimeError):
    """The server cannot start here (missing extra, no shared libpython, ...)."""


@dataclass
class ServeOptions:
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 0  # 0: no batching (no batch dimension); else the dynamic batcher's largest batch
    queue_delay_us: int = 0  # how long the dynamic batcher waits to fill a batch
    address: str = "0.0.0.0"
    exit_timeout_s: int = 30  # how long a stop waits for requests in flight


def prepare_environment() -> None:
    """Set the environment that the tritonserver child and its Python-backend stubs inherit.

    This interpreter's own lib directory goes first on LD_LIBRARY_PATH: the stub links
    `libpython3.X.so`, and without this it may load the system's libpython of the same minor
    version (e.g. Debian's 3.11.2 under a pyenv 3.11.7 venv) and fail in the first import of a
    compiled module.

    Raises ServeError where this Python has no shared libpython."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise ServeError(
            f"this Python ({sys.executable}) was built without a shared libpython, which Triton's Python "
            "backend needs: use a Python built with --enable-shared (the distributions' python3, or "
            "`PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install 3.11`)"
        )
    libdir = str(sysconfig.get_config_var("LIBDIR"))
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p and p != libdir]
    os.environ["LD_LIBRARY_PATH"] = ":".join([libdir, *paths])
    # Tensors between Triton's stubs and this process as base64 over PyTriton's sockets instead
    # of its shared-memory tensor store: the store starts a manager process in the first
    # instance's stub, which on a loaded machine outlasts the 1 s that the other instances wait
    # for it (the model then fails to load), and it needs a /dev/shm larger than a container's
    # default 64 MB. The codec's tensors (an image, a stream) are small enough for base64.
    os.environ["PYTRITON_NO_TENSORSTORE"] = "1"


class WireError(Exception):
    """What PyTriton carries from an inference callable to the proxy model (serving/proxy_model.py):
    its message is the one line `osdiff-error <error_report as JSON>`."""


def start(codecs: list[Codec], options: ServeOptions) -> Any:
    """Start Triton with `osdiff_compress` and `osdiff_decompress`, one instance of each per
    codec; returns the running `pytriton.triton.Triton` (its `serve()` blocks, `stop()` stops).
    Raises ServeError when the serve extra is missing or Triton does not load the models."""
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig, TritonLifecyclePolicy
        from pytriton.utils.workspace import Workspace
    except ImportError as e:
        raise ServeError(f"serving needs the serve extra: pip install 'osdiff-engine[serve]' ({e})") from e

    prepare_environment()
    config = TritonConfig(http_address=options.address, http_port=options.http_port,
                          grpc_address=options.address, grpc_port=options.grpc_port,
                          allow_metrics=True, metrics_port=options.metrics_port,
                          exit_timeout_secs=options.exit_timeout_s, strict_readiness=True)
    batched = options.max_batch > 0
    model_config = (ModelConfig(batching=True, max_batch_size=options.max_batch,
                                batcher=DynamicBatcher(max_queue_delay_microseconds=options.queue_delay_us))
                    if batched else ModelConfig(batching=False))
    models = [CodecModels(c, batched) for c in codecs]

    def tensors(specs: tuple[TensorSpec, ...]) -> list[Any]:
        return [Tensor(name=s.name, dtype=bytes if s.dtype is np.object_ else s.dtype, shape=s.shape, optional=s.optional)
                for s in specs]

    def infer_fn(method: Callable[[list[Any]], list[dict[str, np.ndarray]]]) -> Callable[[list[Any]], list[dict[str, np.ndarray]]]:
        def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
            try:
                return method([r.data for r in requests])
            except Exception as e:
                report = error_report(e)
                if report["code"] == "INVALID_ARG":
                    LOG.info("bad request: %s", report["message"])
                raise WireError(f"osdiff-error {json.dumps(report)}") from None

        return infer

    # The local model store: tritonserver starts with the models in its repository (see above).
    workspace = Workspace()
    triton = Triton(config=config, workspace=workspace,
                    triton_lifecycle_policy=TritonLifecyclePolicy(launch_triton_on_startup=False, local_model_store=True))
    try:
        for name in (COMPRESS, DECOMPRESS):
            methods = [m.compress if name == COMPRESS else m.decompress for m in models]
            triton.bind(model_name=name, infer_func=[infer_fn(f) for f in methods],
                        inputs=tensors(INPUTS[name]), outputs=tensors(OUTPUTS[name]), config=model_config, strict=True)
            install_proxy_model(workspace.model_store_path / name / "1")
        triton.run()
    except Exception as e:
        with contextlib.suppress(Exception):
            triton.stop()
        raise ServeError(f"Triton did not start the models: {type(e).__name__}: {e}") from e
    return triton


def install_proxy_model(version_dir: Path) -> None:
    """Put serving/proxy_model.py in place of PyTriton's proxy model.py (kept as pytriton_model.py)
    in a model version folder of PyTriton's local model store."""
    pytriton_model = version_dir / "model.py"
    if not pytriton_model.exists():
        raise ServeError(f"PyTriton wrote no proxy model at {pytriton_model}: an unsupported PyTriton version?")
    pytriton_model.rename(version_dir / "pytriton_model.py")
    shutil.copyfile(Path(__file__).with_name("proxy_model.py"), pytriton_model)


class _WireErrorFilter(logging.Filter):
    """PyTriton logs every failed call with its traceback at WARNING; ours are logged already
    (a bad request in one line, an internal error with its traceback and incident id)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "osdiff-error {" not in record.getMessage()


LOG = logging.getLogger("osdiff.serving")
logging.getLogger("pytriton.proxy.inference").addFilter(_WireErrorFilter())


def serve_forever(triton: Any) -> None:
    """Serve until SIGINT or SIGTERM (what Kubernetes sends), then stop cleanly."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    triton.serve()
