"""A client of the two models over Triton's HTTP or gRPC protocol (tritonclient), for programs,
tests and benchmarks/serve_load.py. Errors come back as tritonclient's InferenceServerException
with the server's message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from osdiff.serving.models import COMPRESS, DECOMPRESS

_TRITON_DTYPES = {np.dtype(np.uint8): "UINT8", np.dtype(np.uint32): "UINT32", np.dtype(np.float32): "FP32",
                  np.dtype(np.int64): "INT64", np.dtype(np.object_): "BYTES"}


class CodecClient:
    """url: host:port of the server's HTTP (protocol "http") or gRPC ("grpc") endpoint.
    Finds out from the server whether the models batch (then it adds the batch dimension)."""

    def __init__(self, url: str, protocol: str = "http", timeout_s: float = 600.0) -> None:
        if protocol == "http":
            import tritonclient.http as tc
        elif protocol == "grpc":
            import tritonclient.grpc as tc  # type: ignore[no-redef]
        else:
            raise ValueError(f"protocol must be http or grpc, got {protocol!r}")
        self.tc = tc
        self.protocol = protocol
        self.timeout_s = timeout_s
        if protocol == "http":
            self.client: Any = tc.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
            config = self.client.get_model_config(COMPRESS)
        else:
            self.client = tc.InferenceServerClient(url)
            config = self.client.get_model_config(COMPRESS, as_json=True)["config"]
        self.batched = int(config.get("max_batch_size", 0)) > 0

    def compress(self, image: np.ndarray, seed: int | None = None) -> bytes:
        """H x W x 3 uint8 -> .osd bytes."""
        inputs = {"image": image} | ({} if seed is None else {"seed": np.array([seed], np.uint32)})
        return bytes(self.infer(COMPRESS, inputs, ["stream"])["stream"].reshape(-1)[0])

    def decompress(self, data: bytes) -> np.ndarray:
        """.osd bytes -> H x W x 3 uint8."""
        image = self.infer(DECOMPRESS, {"stream": np.array([data], dtype=np.object_)}, ["image"])["image"]
        return image[0] if self.batched else image

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str],
              batch_dim: bool | None = None) -> dict[str, np.ndarray]:
        """One request with these tensors as they are (plus the batch dimension where the models
        batch, unless batch_dim says otherwise); any dtype or shape, for testing bad requests too."""
        add_batch = self.batched if batch_dim is None else batch_dim
        tensors = []
        for name, x in inputs.items():
            x = x[None] if add_batch else x
            t = self.tc.InferInput(name, list(x.shape), _TRITON_DTYPES[x.dtype])
            t.set_data_from_numpy(x)
            tensors.append(t)
        requested = [self.tc.InferRequestedOutput(n) for n in outputs]
        if self.protocol == "http":
            result = self.client.infer(model, tensors, outputs=requested)
        else:
            result = self.client.infer(model, tensors, outputs=requested, client_timeout=self.timeout_s)
        return {n: result.as_numpy(n) for n in outputs}

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "CodecClient":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def wait_ready(http_url: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Wait until the server at host:port (HTTP) has both models ready: Triton's own readiness
    can come before the models load. `alive` says whether the server process still runs.
    Raises RuntimeError when it stops, TimeoutError after timeout_s."""
    import tritonclient.http as th

    client = th.InferenceServerClient(http_url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if not alive():
                raise RuntimeError("the server exited before it was ready")
            try:
                if client.is_model_ready(COMPRESS) and client.is_model_ready(DECOMPRESS):
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)
    finally:
        client.close()
    raise TimeoutError(f"the server at {http_url} was not ready within {timeout_s:.0f} s")
