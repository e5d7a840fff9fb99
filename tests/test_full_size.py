"""The full-size architecture (1.3 B parameters in use) with random weights, on the CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from osdiff.calibration.precision import FP16_GRAPHS
from osdiff.config import ModelConfig
from osdiff.export.model import OSDiffModel, graph_shapes
from osdiff.runtime.backends.torch_backend import TorchBackend
from osdiff.runtime.codec import Codec


@pytest.fixture(scope="module")
def full_model():
    return OSDiffModel.random(ModelConfig.full(), seed=0)


def test_every_stage_runs_on_a_64x64_image(full_model):
    backend = TorchBackend(full_model)
    cfg = full_model.config
    shapes = graph_shapes(cfg, "denoiser", 1, 64, 64)
    assert shapes["y_c"] == (1, 4, 8, 8)
    for name, g in full_model.graphs().items():
        s = graph_shapes(cfg, name, 1, 64, 64)
        outputs = backend.run(name, *(torch.rand(s[i]) for i in g.inputs))
        for out_name, out in zip(g.outputs, outputs):
            assert tuple(out.shape) == s[out_name], (name, out_name)
            assert torch.isfinite(out).all(), (name, out_name)

    codec = Codec(backend)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    data = codec.compress(image)
    decoded = codec.decompress(data)
    assert decoded.shape == (64, 64, 3)
    assert 16 < len(data) < 64 * 64  # z (192 symbols) and y (320 x 16) cost something, not much


@pytest.mark.slow
def test_full_size_onnx_export_matches_pytorch(full_model, tmp_path, capsys):
    """Every full-size graph, fp32 and fp16, exported (the denoiser's 3.5 GB of weights go to
    external data) and run on ONNX Runtime at two small resolutions."""
    from osdiff.export.onnx_export import export_onnx
    from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    export_onnx(full_model, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert (tmp_path / "fp32" / "denoiser.onnx.data").exists()
    assert manifest["graphs"]["entropy_anchor_9"]["shapes"]["scales"] == ["batch", 96, "height/16", "width/32"]
    torch_backend = TorchBackend(full_model)
    report = {}
    for precision in ("fp32", "fp16"):
        ort_backend = OnnxRuntimeBackend(tmp_path, precision=precision)
        for height, width in ((64, 64), (64, 128)):
            for name, g in torch_backend.graphs.items():
                if precision == "fp16" and name not in FP16_GRAPHS:
                    continue
                s = graph_shapes(full_model.config, name, 1, height, width)
                gen = torch.Generator().manual_seed(0)
                inputs = [torch.rand(s[i], generator=gen) for i in g.inputs]
                err = max(float((o - r).abs().max() / r.abs().max().clamp_min(1e-12))
                          for o, r in zip(ort_backend.run(name, *inputs), torch_backend.run(name, *inputs)))
                report[(precision, name)] = max(err, report.get((precision, name), 0.0))
        del ort_backend
    with capsys.disabled():
        print("\nfull size, ONNX Runtime CPU vs PyTorch, max relative error:")
        for (precision, name), err in report.items():
            print(f"  {precision} {name:<22} {err:.1e}")
    assert all(err <= 1e-4 for (p, _), err in report.items() if p == "fp32")
    assert all(err < 2e-2 for (p, _), err in report.items() if p == "fp16")
