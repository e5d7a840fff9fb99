"""ONNX export: every graph passes the checker and matches its PyTorch stage on ONNX Runtime."""

from __future__ import annotations

import json
import os
import stat

import onnx
import pytest
import torch

from osdiff.calibration.precision import FP16_GRAPHS
from osdiff.export.model import graph_shapes
from osdiff.export.onnx_export import ExportError, load_export
from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from osdiff.runtime.backends.torch_backend import TorchBackend

SIZES = [(128, 192), (192, 64)]  # two resolutions, neither the one traced at export


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def graph_inputs(cfg, graph, names, height, width, seed=0) -> list[torch.Tensor]:
    shapes = graph_shapes(cfg, graph, 1, height, width)
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(shapes[n], generator=g) if n == "image" else torch.randn(shapes[n], generator=g) for n in names]


def test_manifest_describes_every_graph(tiny_export, tiny_model):
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    graphs = tiny_model.graphs()
    assert list(manifest["graphs"]) == list(graphs)
    assert manifest["model"]["fingerprint"] == tiny_model.fingerprint.hex()
    assert manifest["opset"] == 18
    for name, entry in manifest["graphs"].items():
        assert tuple(entry["inputs"]) == graphs[name].inputs and tuple(entry["outputs"]) == graphs[name].outputs
        assert ("fp16" in entry) == (name in FP16_GRAPHS)
        proto = onnx.load(str(tiny_export / entry["fp32"]["file"]), load_external_data=False)
        assert [i.name for i in proto.graph.input] == list(entry["inputs"])
        for i in proto.graph.input:  # float32 edges, dynamic batch and sides
            assert i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
            dims = i.type.tensor_type.shape.dim
            assert all(d.dim_param for d in (dims[0], dims[2], dims[3]))
        # attention as ONNX Runtime's fused MultiHeadAttention (its CPU flash path), and no loops
        ops = {n.op_type for n in proto.graph.node}
        has_attention = name in ("vae_encoder", "denoiser", "vae_decoder")
        assert entry["attention"] == ("mha" if has_attention else None), name
        assert ("MultiHeadAttention" in ops) == has_attention and not {"Scan", "Loop"} & ops, name
        # GELU: one com.microsoft.Gelu in the heavy graphs; the LFGCM graphs keep the exporter's five nodes
        gelus = [n.domain for n in proto.graph.node if n.op_type == "Gelu"]
        if name in FP16_GRAPHS:
            assert "Erf" not in ops and set(gelus) <= {"com.microsoft"}, name
        else:
            assert not gelus, name
        if name in ("synthesis", "denoiser"):
            assert gelus, name  # G_s's bottlenecks, the UNet's GEGLU
    assert manifest["graphs"]["denoiser"]["shapes"]["x_T"] == ["batch", 4, "height/8", "width/8"]
    assert manifest["graphs"]["entropy_anchor_1"]["shapes"]["scales"] == ["batch", 6, "height/16", "width/32"]
    assert manifest["entropy"]["bottleneck"]["cdfs"] == tiny_model.entropy_bottleneck.tables.cdfs


def test_every_graph_passes_the_checker(tiny_export):
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    for entry in manifest["graphs"].values():
        for precision in ("fp32", "fp16"):
            if precision in entry:
                onnx.checker.check_model(str(tiny_export / entry[precision]["file"]), full_check=True)


@pytest.mark.parametrize("height,width", SIZES)
def test_fp32_graphs_match_pytorch(tiny_export, tiny_model, height, width):
    torch_backend = TorchBackend(tiny_model)
    ort_backend = OnnxRuntimeBackend(tiny_export, precision="fp32")
    for name, g in torch_backend.graphs.items():
        inputs = graph_inputs(tiny_model.config, name, g.inputs, height, width)
        for ours, ref in zip(ort_backend.run(name, *inputs), torch_backend.run(name, *inputs)):
            assert ours.shape == ref.shape
            assert relative_error(ours, ref) <= 1e-4, name


def test_fp16_graphs_error_report(tiny_export, tiny_model, capsys):
    """fp16 is reported, not held to fp32's bound; it must stay a usable approximation."""
    torch_backend = TorchBackend(tiny_model)
    ort_backend = OnnxRuntimeBackend(tiny_export, precision="fp16")
    errors = {}
    for name in FP16_GRAPHS:
        inputs = graph_inputs(tiny_model.config, name, torch_backend.graphs[name].inputs, *SIZES[0])
        errors[name] = max(relative_error(o, r) for o, r in zip(ort_backend.run(name, *inputs), torch_backend.run(name, *inputs)))
    with capsys.disabled():
        print("\nfp16 vs fp32 max relative error (tiny, ONNX Runtime CPU):",
              ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert all(e < 1e-2 for e in errors.values()), errors


def test_batched_graphs(tiny_export, tiny_model):
    torch_backend = TorchBackend(tiny_model)
    ort_backend = OnnxRuntimeBackend(tiny_export)
    shapes = graph_shapes(tiny_model.config, "denoiser", 2, 128, 128)
    y_c, x_T = torch.randn(shapes["y_c"]), torch.randn(shapes["x_T"])
    (ours,), (ref,) = ort_backend.run("denoiser", y_c, x_T), torch_backend.run("denoiser", y_c, x_T)
    assert relative_error(ours, ref) <= 1e-4
    (single,) = ort_backend.run("denoiser", y_c[1:], x_T[1:])
    assert relative_error(single, ref[1:]) <= 1e-4


def test_export_directory_problems_are_named(tiny_export, tmp_path):
    with pytest.raises(ExportError, match="no readable manifest.json"):
        load_export(tmp_path)
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    manifest["entropy"]["bottleneck"]["cdfs"][0][1] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "entropy_bottleneck.safetensors").write_bytes((tiny_export / "entropy_bottleneck.safetensors").read_bytes())
    with pytest.raises(ExportError, match="bottleneck CDF tables in manifest.json differ"):
        load_export(tmp_path)
    manifest["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="re-export"):
        load_export(tmp_path)


def test_every_exported_file_gets_the_mode_the_umask_gives(tiny_export):
    """Graphs, weights, the z prior and the manifest alike (the z prior's file was once 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in tiny_export.rglob("*") if p.is_file()]
    assert any(p.name == "entropy_bottleneck.safetensors" for p in files)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p


def test_gelu_is_one_node_for_onnx_runtime_and_five_for_tensorrt(tmp_path):
    """export/models/gelu.py: exact GELU exported as com.microsoft.Gelu computes PyTorch's GELU
    in ONNX Runtime; plain_gelu writes the five nodes back (constants in the graph's dtype, no
    contrib op or domain left), the same function again, and engine/prepare.py does so before
    TensorRT."""
    import numpy as np
    import onnxruntime as ort

    from osdiff.export.models.gelu import onnx_translation, plain_gelu

    def export(module, x, path):
        with torch.no_grad():
            program = torch.onnx.export(module, (x,), dynamo=True, opset_version=18, input_names=["x"],
                                        custom_translation_table=onnx_translation(), verbose=False)
        program.save(str(path))
        return onnx.load(str(path))

    def run(model, x):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x.numpy()})[0]

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.GELU(), torch.nn.Conv2d(8, 3, 1)).eval()
    x = torch.randn(2, 3, 9, 7) * 3
    with torch.no_grad():
        ref = module(x).numpy()
    model = export(module, x, tmp_path / "gelu.onnx")
    assert [(n.op_type, n.domain) for n in model.graph.node if n.op_type in ("Gelu", "Erf")] == [("Gelu", "com.microsoft")]
    np.testing.assert_allclose(run(model, x), ref, rtol=1e-5, atol=1e-6)
    assert plain_gelu(model) == 1
    assert {n.op_type for n in model.graph.node} >= {"Div", "Erf"} and "Gelu" not in {n.op_type for n in model.graph.node}
    assert "com.microsoft" not in {o.domain for o in model.opset_import}
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_allclose(run(model, x), ref, rtol=1e-5, atol=1e-6)

    half = export(module.half(), x.half(), tmp_path / "gelu16.onnx")
    assert plain_gelu(half) == 1
    assert {i.data_type for i in half.graph.initializer if "/plain/" in i.name} == {onnx.TensorProto.FLOAT16}
    np.testing.assert_allclose(run(half, x.half()).astype(np.float32), ref, rtol=2e-2, atol=2e-2)

    pytest.importorskip("polygraphy", reason="Polygraphy (engine/prepare.py) is not installed")
    from osdiff.engine.prepare import prepare_onnx

    prepare_onnx(tmp_path / "gelu.onnx", tmp_path / "prepared.onnx")
    prepared = onnx.load(str(tmp_path / "prepared.onnx"))
    assert "Gelu" not in {n.op_type for n in prepared.graph.node}
    np.testing.assert_allclose(run(prepared, x), ref, rtol=1e-5, atol=1e-6)
