"""What this machine offers the TensorRT path: the tensorrt package and a CUDA GPU.

tensorrt is an optional extra (PyPI has only stub packages that fetch the real wheels from NVIDIA's
index), so nothing imports it at module level: the builder and the backend call
`tensorrt_version()` first, which turns its absence into one clear error, and import it inside
their functions.
"""

from __future__ import annotations

import torch

from osdiff.engine.manifest import EngineError, Gpu

INSTALL = ('on a machine with an NVIDIA GPU, install it with: pip install -e ".[tensorrt]" '
           "(from the osdiff checkout; the tensorrt package fetches its wheels from NVIDIA's index)")


class TensorRTMissing(EngineError):
    """The tensorrt package cannot be imported."""


def tensorrt_version() -> str:
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but its CUDA libraries are not
        raise TensorRTMissing(f"TensorRT cannot be imported ({e}); {INSTALL}") from e
    # tensorrt-stubs (the type stubs CI checks against) installs a `tensorrt` folder holding only
    # .pyi files, which imports as an empty namespace package.
    version = getattr(trt, "__version__", None)
    if version is None:
        raise TensorRTMissing(f"TensorRT is not installed (only its type stubs are); {INSTALL}")
    return str(version)


def current_gpu(device: str | torch.device = "cuda") -> Gpu:
    device = torch.device(device)
    if device.type != "cuda":
        raise EngineError(f"TensorRT engines run on a CUDA device, not {device}")
    if not torch.cuda.is_available():
        raise EngineError("no CUDA GPU is visible here (torch.cuda.is_available() is False); TensorRT needs one")
    index = torch.cuda.current_device() if device.index is None else device.index
    major, minor = torch.cuda.get_device_capability(index)
    return Gpu(torch.cuda.get_device_name(index), f"{major}.{minor}")
