"""What must hold on every torch that pyproject.toml declares: every graph of the demo model
exports to ONNX and runs in ONNX Runtime, and torch.compile (inductor) of each heavy graph
matches eager. Slow (minutes of exporting and compiling): `make test-slow` runs them under CI's
torch, and the compatibility legs under the others (`make test-gpu-image`: the GPU machine's
torch 2.11 stack; `make test-torch-newest`: the newest torch the declared range admits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from osdiff.config import ModelConfig
from osdiff.export.model import OSDiffModel, graph_shapes

HEAVY = ["vae_encoder", "synthesis", "denoiser", "vae_decoder"]


@pytest.fixture(scope="module")
def demo_model():
    return OSDiffModel.random(ModelConfig.demo(), seed=0)


def _inputs(model, graph, height=128, width=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = graph_shapes(model.config, graph, 1, height, width)
    return [torch.randn(shapes[name], generator=g) for name in model.graphs()[graph].inputs]


def _rel(a, b):
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)


@pytest.mark.slow
def test_every_demo_graph_exports_and_matches(demo_model, tmp_path):
    import onnxruntime as ort

    from osdiff.export.onnx_export import export_onnx

    manifest = export_onnx(demo_model, tmp_path, fp16=False)
    graphs = demo_model.graphs()
    assert set(manifest["graphs"]) == set(graphs)
    for name, entry in manifest["graphs"].items():
        session = ort.InferenceSession(str(tmp_path / entry["fp32"]["file"]), providers=["CPUExecutionProvider"])
        args = _inputs(demo_model, name, 192, 256)  # not the size the export traced at
        with torch.no_grad():
            ref = graphs[name].module(*args)
        ref = ref if isinstance(ref, tuple) else (ref,)
        outs = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})
        for o, r in zip(outs, ref):
            assert _rel(torch.from_numpy(np.asarray(o)), r) <= 1e-4, name


@pytest.mark.slow
@pytest.mark.parametrize("graph", HEAVY)
def test_torch_compile_of_each_heavy_graph_matches_eager(demo_model, graph):
    module = demo_model.graphs()[graph].module.eval()
    args = _inputs(demo_model, graph)
    with torch.no_grad():
        eager = module(*args)
        compiled = torch.compile(module, mode="default")(*args)
    eager = eager if isinstance(eager, tuple) else (eager,)
    compiled = compiled if isinstance(compiled, tuple) else (compiled,)
    for c, e in zip(compiled, eager):
        assert _rel(c, e) <= 1e-4, graph
