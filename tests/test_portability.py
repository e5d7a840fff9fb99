"""Streams that decode on every machine: the entropy tables and the model identity come out
the same under every CPU capability torch and numpy can select (each in its own process), and
streams encoded under one capability decode under another, with PyTorch and ONNX Runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TINY

sys.path.insert(0, str(REPO / "benchmarks"))
from portability import capabilities  # noqa: E402

IDENTITY = f"""
import json, torch
from osdiff.config import ModelConfig
from osdiff.export.model import OSDiffModel, _random_bottleneck
from osdiff.runtime.entropy import EntropyBottleneck, GaussianConditional, tables_digest
tiny = {str(TINY)!r}
model = OSDiffModel.load(tiny + "/sd21_tiny.ckpt", tiny + "/osdiff_tiny.ckpt", ModelConfig.from_json(tiny + "/config.json"))
torch.manual_seed(0)
wide = EntropyBottleneck(_random_bottleneck(192, init_scale=4.0, support=12.0))
print(json.dumps({{"capability": torch.backends.cpu.get_cpu_capability(), "weights_id": model.weights_id.hex(),
                  "tables_id": model.entropy_models.tables_id.hex(),
                  "wide_tables": tables_digest(GaussianConditional(), wide).hex()}}))
"""


def run_python(code: str, **env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def numpy_dispatch_features() -> str:
    """Every SIMD feature numpy dispatches to on this CPU (NPY_DISABLE_CPU_FEATURES turns them off)."""
    try:
        from numpy._core import _multiarray_umath as umath  # numpy >= 2
    except ImportError:
        from numpy.core import _multiarray_umath as umath
    return " ".join(f for f in umath.__cpu_dispatch__ if umath.__cpu_features__.get(f))


@pytest.fixture(scope="module")
def identities(tiny_dir) -> dict[str, dict]:
    runs = {cap: run_python(IDENTITY, ATEN_CPU_CAPABILITY=cap) for cap in capabilities()}
    runs["default, numpy without SIMD"] = run_python(IDENTITY, ATEN_CPU_CAPABILITY="default",
                                                     NPY_DISABLE_CPU_FEATURES=numpy_dispatch_features())
    return runs


def test_tables_and_identity_are_the_same_under_every_cpu_capability(identities, tiny_model):
    print("\ncapabilities:", {k: v["capability"] for k, v in identities.items()})
    assert len({v["capability"] for v in identities.values()}) == len(capabilities())
    for run in identities.values():
        assert run["weights_id"] == tiny_model.weights_id.hex()
        assert run["tables_id"] == tiny_model.entropy_models.tables_id.hex()
    assert len({run["wide_tables"] for run in identities.values()}) == 1


def other_capability() -> str:
    """A capability other than the one this process runs under."""
    caps = capabilities()
    return caps[0] if len(caps) > 1 else caps[-1]


def test_an_export_made_under_another_capability_has_this_identity(tiny_model, tmp_path):
    code = f"""
import json
from osdiff.config import ModelConfig
from osdiff.export.model import OSDiffModel
from osdiff.export.onnx_export import export_onnx
tiny = {str(TINY)!r}
model = OSDiffModel.load(tiny + "/sd21_tiny.ckpt", tiny + "/osdiff_tiny.ckpt", ModelConfig.from_json(tiny + "/config.json"))
export_onnx(model, {str(tmp_path)!r}, fp16=False, only=["hyper_synthesis"])
print(json.dumps({{}}))
"""
    run_python(code, ATEN_CPU_CAPABILITY=other_capability())
    from osdiff.export.onnx_export import load_export

    manifest, models = load_export(tmp_path)  # derives the tables again here: they must match
    assert models.fingerprint == tiny_model.fingerprint
    assert manifest["model"]["weights_id"] == tiny_model.weights_id.hex()


def test_streams_encoded_under_another_capability_decode_here(tiny_model, tiny_export, tmp_path):
    from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from osdiff.runtime.backends.torch_backend import TorchBackend
    from osdiff.runtime.codec import Codec

    args = {"sd": None, "osdiff": None, "config": None, "size": [128, 192], "images": 6}
    cmd = [sys.executable, str(REPO / "benchmarks" / "portability.py"), "worker", "encode", str(tmp_path), json.dumps(args)]
    done = subprocess.run(cmd, env=dict(os.environ, ATEN_CPU_CAPABILITY=other_capability()), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    streams = sorted(Path(tmp_path).glob("*.osd"))
    assert len(streams) == 6
    for codec in (Codec(TorchBackend(tiny_model)), Codec(OnnxRuntimeBackend(tiny_export))):
        for path in streams:
            image = codec.decompress(path.read_bytes())  # raises StreamError unless every symbol matches
            assert image.shape == (128, 192, 3) and image.dtype == np.uint8
