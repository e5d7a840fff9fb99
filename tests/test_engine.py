"""The TensorRT path: what CI can check without a GPU, then what only a GPU can.

Without TensorRT: profiles from the export's symbolic shapes, engine manifests and every mismatch
error with its rebuild command, ONNX preparation with Polygraphy, the TensorRT backend's own
bookkeeping (run against a recording double, which proves nothing about TensorRT itself), the CLI
errors where TensorRT is missing, and that no API removed in TensorRT 11 is used. The tests marked
`gpu` build and run real engines; they are skipped, with the reason, where TensorRT or a GPU is
missing.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import types
from dataclasses import asdict

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from conftest import REPO
from osdiff.cli.model import build as build_command_cli
from osdiff.cli import main
from osdiff.engine.manifest import EngineError, EngineManifest, Gpu, build_command
from osdiff.engine.profiles import DEFAULT_PROFILE, ImageSize, ShapeProfile, image_size, resolve
from osdiff.export.model import graph_shapes, graphs
from osdiff.export.onnx_export import symbolic_shapes
from osdiff.files import psnr

H100 = Gpu("NVIDIA H100 80GB HBM3", "9.0")
PROFILES = [ShapeProfile.parse(DEFAULT_PROFILE), ShapeProfile.parse("1x1088x1088:1x1536x1536:1x2048x2048")]


@pytest.fixture(scope="module")
def tiny_graphs(tiny_config) -> dict[str, tuple[list[str], list[str], dict]]:
    """Per graph of the tiny model: inputs, outputs, and the symbolic shapes the export writes."""
    from osdiff.export.model import build_stages

    with torch.device("meta"):
        all_graphs = graphs(tiny_config, build_stages(tiny_config, with_text=False))
    return {name: (list(g.inputs), list(g.outputs), symbolic_shapes(tiny_config, name))
            for name, g in all_graphs.items()}


@pytest.fixture
def manifest(tiny_config, tiny_graphs, tmp_path) -> EngineManifest:
    """An engine manifest as `osdiff build` writes it (and reads it back), for the tiny model."""
    m = EngineManifest(tensorrt="10.13.0.35", gpu=H100, model_name=tiny_config.name, fingerprint="ab" * 32,
                       onnx_dir=str(tmp_path / "onnx"), profiles=[str(p) for p in PROFILES], workspace_mib=4096,
                       optimization_level=3)
    for name, (inputs, outputs, shapes) in tiny_graphs.items():
        m.graphs[name] = {"engine": f"{name}.engine", "onnx": f"fp32/{name}.onnx", "precision": "fp32",
                          "onnx_sha256": f"sha-{name}", "inputs": inputs, "outputs": outputs, "shapes": shapes,
                          "profile_shapes": [p.input_shapes(shapes, inputs) for p in PROFILES], "build_seconds": 1.0}
    return EngineManifest(**json.loads(json.dumps(asdict(m))) | {"gpu": m.gpu})


def gpu_and_tensorrt_missing() -> str | None:
    from osdiff.engine.environment import current_gpu, tensorrt_version

    try:
        tensorrt_version(), current_gpu()
    except EngineError as e:
        return str(e)
    return None


MISSING = gpu_and_tensorrt_missing()
needs_gpu = pytest.mark.skipif(MISSING is not None, reason=f"needs TensorRT and a CUDA GPU: {MISSING}")


# ---------------------------------------------------------------------------------------------
# Profiles and shapes
# ---------------------------------------------------------------------------------------------


def test_sizes_and_profiles_parse_and_print():
    p = ShapeProfile.parse(DEFAULT_PROFILE)
    assert p == (ImageSize(1, 256, 256), ImageSize(1, 512, 768), ImageSize(4, 1024, 1024))
    assert str(p) == DEFAULT_PROFILE
    p.check(64)
    assert p.covers(ImageSize(2, 512, 1024)) and not p.covers(ImageSize(1, 1088, 512))
    for bad in ("512x768", "1x2x3x4", "axbxc"):
        with pytest.raises(ValueError, match="BATCHxHEIGHTxWIDTH"):
            ImageSize.parse(bad)
    with pytest.raises(ValueError, match="MIN:OPT:MAX"):
        ShapeProfile.parse("1x256x256:4x1024x1024")
    with pytest.raises(ValueError, match="multiples of 64"):
        ShapeProfile.parse("1x256x250:1x512x768:4x1024x1024").check(64)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        ShapeProfile.parse("1x512x256:1x256x768:4x1024x1024").check(64)
    with pytest.raises(ValueError, match="positive"):
        ShapeProfile.parse("0x256x256:1x512x768:4x1024x1024").check(64)


def test_symbolic_shapes_resolve_to_every_graph_shape_and_back(tiny_config, tiny_graphs):
    for size in (ImageSize(1, 256, 256), ImageSize(3, 512, 768)):
        for name, (_, _, shapes) in tiny_graphs.items():
            concrete = graph_shapes(tiny_config, name, *size)
            assert {io: resolve(dims, size) for io, dims in shapes.items()} == concrete, name
            assert image_size(shapes, concrete) == size, name


def test_profile_gives_min_opt_max_for_every_dynamic_input(tiny_graphs):
    p = ShapeProfile.parse(DEFAULT_PROFILE)
    for name, (inputs, _, shapes) in tiny_graphs.items():
        profile_shapes = p.input_shapes(shapes, inputs)
        assert list(profile_shapes) == inputs, name  # every input of our graphs follows the image
        for io, min_opt_max in profile_shapes.items():
            assert min_opt_max == tuple(resolve(shapes[io], s) for s in p), (name, io)
    dims = {"image": ["batch", 3, "height", "width"], "context": [1, 77, 32]}
    assert p.input_shapes(dims, ["image", "context"]) == {
        "image": ((1, 3, 256, 256), (1, 3, 512, 768), (4, 3, 1024, 1024))}  # static inputs need no profile


def test_image_size_rejects_inconsistent_inputs(tiny_config, tiny_graphs):
    shapes = tiny_graphs["denoiser"][2]
    good = graph_shapes(tiny_config, "denoiser", 1, 512, 768)
    with pytest.raises(ValueError, match="disagrees"):
        image_size(shapes, {"y_c": good["y_c"], "x_T": (1, 4, 64, 80)})
    with pytest.raises(ValueError, match="expected shape"):
        image_size(shapes, {"y_c": (1, 5, 64, 96), "x_T": good["x_T"]})
    with pytest.raises(ValueError, match="dimensions"):
        image_size(shapes, {"y_c": (1, 4, 64), "x_T": good["x_T"]})
    with pytest.raises(ValueError, match="do not determine"):
        image_size({"k": [1, 77, "width"]}, {"k": (1, 77, 64)})


# ---------------------------------------------------------------------------------------------
# Engine manifests and mismatch errors
# ---------------------------------------------------------------------------------------------


def test_manifest_round_trips(manifest, tmp_path):
    m = manifest
    m.write(tmp_path)
    assert EngineManifest.read(tmp_path) == m
    assert m.shape_profiles() == PROFILES


def test_manifest_read_errors(tmp_path):
    with pytest.raises(EngineError, match="not an osdiff-tensorrt directory"):
        EngineManifest.read(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "osdiff-onnx", "format_version": 1}')
    with pytest.raises(EngineError, match="is not osdiff-tensorrt v1"):
        EngineManifest.read(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "osdiff-tensorrt", "format_version": 1, "tensorrt": "10"}')
    with pytest.raises(EngineError, match="incomplete"):
        EngineManifest.read(tmp_path)


def test_rebuild_command_is_a_valid_build_invocation(manifest, tmp_path):
    m = manifest
    (tmp_path / "onnx").mkdir()
    command = m.rebuild_command(tmp_path / "engines")
    args = shlex.split(command)
    assert args[:2] == ["osdiff", "build"]
    ctx = build_command_cli.make_context("build", args[2:])  # parses, does not run
    assert ctx.params["onnx_dir"] == str(tmp_path / "onnx") and ctx.params["output"] == str(tmp_path / "engines")
    assert [ShapeProfile.parse(p) for p in ctx.params["profiles"]] == PROFILES
    assert (ctx.params["workspace"], ctx.params["opt_level"]) == (4096, 3)


@pytest.mark.parametrize("version, gpu, reason", [
    ("10.14.1", H100, "built with TensorRT 10.13.0.35, this is TensorRT 10.14.1"),
    ("10.13.0.35", Gpu("NVIDIA A100-SXM4-80GB", "8.0"), "built on NVIDIA H100 80GB HBM3 (compute capability 9.0), "
                                                         "this is NVIDIA A100-SXM4-80GB (compute capability 8.0)"),
    ("10.13.0.35", Gpu("NVIDIA H100 PCIe", "9.0"), "this is NVIDIA H100 PCIe"),
])
def test_machine_mismatch_names_the_rebuild_command(manifest, tmp_path, version, gpu, reason):
    m = manifest
    m.check_machine(tmp_path, "10.13.0.35", H100)
    with pytest.raises(EngineError) as e:
        m.check_machine(tmp_path, version, gpu)
    assert reason in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).endswith(m.rebuild_command(tmp_path))


def test_model_and_export_mismatches_name_the_rebuild_command(manifest, tmp_path):
    m = manifest
    m.check_model(tmp_path, "ab" * 32)
    with pytest.raises(EngineError, match="not of model cdcdcd") as e:
        m.check_model(tmp_path, "cd" * 32)
    assert str(e.value).endswith(m.rebuild_command(tmp_path))

    onnx_dir = tmp_path / "other_onnx"
    export = {"model": {"fingerprint": "ab" * 32},
              "graphs": {n: {"fp32": {"sha256": e["onnx_sha256"]}} for n, e in m.graphs.items()}}
    m.check_export(tmp_path, onnx_dir, export)
    command = build_command(onnx_dir, tmp_path, PROFILES, 4096, 3)
    export["graphs"]["synthesis"]["fp32"]["sha256"] = "changed"
    with pytest.raises(EngineError, match="synthesis engine was built from another ONNX file") as e:
        m.check_export(tmp_path, onnx_dir, export)
    assert str(e.value).endswith(command)
    export["model"]["fingerprint"] = "cd" * 32
    with pytest.raises(EngineError, match=f"{onnx_dir} of model cdcdcd") as e:
        m.check_export(tmp_path, onnx_dir, export)
    assert str(e.value).endswith(command)


# ---------------------------------------------------------------------------------------------
# ONNX preparation with Polygraphy
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("graph, precision", [("hyper_synthesis", "fp32"), ("entropy_anchor_1", "fp32"),
                                              ("synthesis", "fp16"), ("vae_decoder", "fp16")])
def test_folded_graph_still_matches_on_onnxruntime(tiny_export, tiny_config, tmp_path, graph, precision):
    from osdiff.engine.prepare import prepare_onnx
    from osdiff.export.models.attention import plain_attention
    from osdiff.export.models.gelu import plain_gelu

    src = tiny_export / precision / f"{graph}.onnx"
    dst = tmp_path / f"{graph}.onnx"
    prepare_onnx(src, dst)
    folded = onnx.load(str(dst))
    onnx.checker.check_model(folded, full_check=True)
    plain = onnx.load(str(src))
    plain_attention(plain)
    plain_gelu(plain)  # the fused ops written out as TensorRT gets them, before folding
    assert len(folded.graph.node) <= len(plain.graph.node)
    assert not {n.domain for n in folded.graph.node} - {""}  # no contrib op left for TensorRT
    for i in folded.graph.input:  # batch, height and width stay dynamic, channels stay fixed
        dims = i.type.tensor_type.shape.dim
        assert [bool(d.dim_param) for d in dims] == [True, False, True, True], i.name
    # at a size other than the one the export traced with
    inputs = [i.name for i in folded.graph.input]
    feed = {n: np.random.default_rng(0).standard_normal(s, dtype=np.float32)
            for n, s in graph_shapes(tiny_config, graph, 1, 192, 256).items() if n in inputs}
    before = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feed)
    after = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, feed)
    for b, a in zip(before, after):
        if precision == "fp32":
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        else:  # ONNX Runtime's fused attention and GELU round once, the plain fp16 nodes at each step
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-3 * float(np.abs(b).max()))


# ---------------------------------------------------------------------------------------------
# The backend's bookkeeping, against a recording double (not TensorRT)
# ---------------------------------------------------------------------------------------------


class RecordingContextDouble:
    """Records what GraphEngine asks of an execution context. It is not TensorRT and runs
    nothing: tests using it check our bookkeeping (which profile, which buffers, when to rebind),
    never TensorRT's behaviour."""

    def __init__(self, profile: int) -> None:
        self.profile = profile
        self.calls: list[tuple] = []

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        self.calls.append(("shape", name, shape))
        return True

    def set_tensor_address(self, name: str, memory: int) -> bool:
        self.calls.append(("address", name, memory))
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.calls.append(("execute", stream_handle))
        return True


@pytest.fixture
def denoiser_engine(manifest, tmp_path):
    from osdiff.runtime.backends.tensorrt_backend import GraphEngine

    contexts: list[RecordingContextDouble] = []

    def new_context(profile: int) -> RecordingContextDouble:
        contexts.append(RecordingContextDouble(profile))
        return contexts[-1]

    engine = GraphEngine("denoiser", manifest, tmp_path, new_context, torch.device("cpu"))
    return engine, contexts


def inputs_at(cfg, graph: str, size: ImageSize) -> list[torch.Tensor]:
    shapes = graph_shapes(cfg, graph, *size)
    return [torch.randn(shapes[n]) for n in ("y_c", "x_T")]


def test_buffers_are_allocated_once_per_size_and_bound_once(tiny_config, denoiser_engine):
    engine, contexts = denoiser_engine
    size = ImageSize(1, 512, 768)
    b = engine.binding(inputs_at(tiny_config, "denoiser", size))
    assert (b.size, b.profile) == (size, 0)
    expected = graph_shapes(tiny_config, "denoiser", *size)
    assert [tuple(t.shape) for t in b.inputs] == [expected["y_c"], expected["x_T"]]
    assert [tuple(t.shape) for t in b.outputs] == [expected["y_r"]]
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in b.inputs + b.outputs)
    assert engine.binding(inputs_at(tiny_config, "denoiser", size)) is b  # the same buffers again

    engine.enqueue(b, stream=7)
    engine.enqueue(b, stream=7)
    (ctx,) = contexts
    assert ctx.profile == 0
    assert ctx.calls == [
        ("shape", "y_c", expected["y_c"]), ("shape", "x_T", expected["x_T"]),
        ("address", "y_c", b.inputs[0].data_ptr()), ("address", "x_T", b.inputs[1].data_ptr()),
        ("address", "y_r", b.outputs[0].data_ptr()),
        ("execute", 7), ("execute", 7),
    ]
    assert engine.rebinds == 1


def test_a_new_size_gets_new_buffers_and_rebinds_its_profiles_context(tiny_config, denoiser_engine):
    engine, contexts = denoiser_engine
    first = engine.binding(inputs_at(tiny_config, "denoiser", ImageSize(1, 512, 768)))
    engine.enqueue(first, 0)
    second = engine.binding(inputs_at(tiny_config, "denoiser", ImageSize(2, 256, 1024)))
    assert second.profile == 0 and second.outputs[0].data_ptr() != first.outputs[0].data_ptr()
    engine.enqueue(second, 0)
    engine.enqueue(first, 0)
    (ctx,) = contexts  # one context per profile, set to each size in turn
    assert [c[2] for c in ctx.calls if c[:2] == ("shape", "x_T")] == [(1, 4, 64, 96), (2, 4, 32, 128), (1, 4, 64, 96)]
    assert engine.rebinds == 3
    assert set(engine.bindings) == {ImageSize(1, 512, 768), ImageSize(2, 256, 1024)}


def test_a_size_beyond_the_first_profile_uses_the_second(tiny_config, denoiser_engine):
    engine, contexts = denoiser_engine
    b = engine.binding(inputs_at(tiny_config, "denoiser", ImageSize(1, 1536, 1152)))
    assert b.profile == 1
    engine.enqueue(b, 0)
    engine.enqueue(engine.binding(inputs_at(tiny_config, "denoiser", ImageSize(1, 512, 512))), 0)
    assert [c.profile for c in contexts] == [1, 0]


def test_a_size_no_profile_holds_names_the_rebuild_command(tiny_config, denoiser_engine, tmp_path):
    engine, contexts = denoiser_engine
    with pytest.raises(EngineError, match="no optimization profile") as e:
        engine.binding(inputs_at(tiny_config, "denoiser", ImageSize(2, 1280, 1280)))
    expected = build_command(tmp_path / "onnx", tmp_path, PROFILES + [ShapeProfile.parse(
        "2x1280x1280:2x1280x1280:2x1280x1280")], 4096, 3)
    assert str(e.value).endswith(expected)
    assert not contexts and not engine.bindings
    with pytest.raises(ValueError, match="takes 2 inputs"):
        engine.binding(inputs_at(tiny_config, "denoiser", ImageSize(1, 512, 768))[:1])


# ---------------------------------------------------------------------------------------------
# Without TensorRT
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stand_in, message", [
    (None, "TensorRT cannot be imported"),  # not installed at all
    (types.ModuleType("tensorrt"), "only its type stubs are"),  # tensorrt-stubs' empty namespace package
])
def test_cli_says_how_to_install_tensorrt(manifest, tiny_export, tmp_path, monkeypatch, stand_in, message):
    monkeypatch.setitem(sys.modules, "tensorrt", stand_in)
    engines = tmp_path / "engines"
    engines.mkdir()
    manifest.write(engines)
    stream = tmp_path / "x.osd"
    stream.write_bytes(b"")
    for args in (["build", tiny_export, "-o", tmp_path / "out"],
                 ["compare", engines, tiny_export],
                 ["decompress", stream, "-o", tmp_path / "x.png", "--backend", "tensorrt", "--engines", engines]):
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 1, result.output
        assert message in result.output and 'pip install -e ".[tensorrt]"' in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_no_api_removed_in_tensorrt_11_is_used():
    removed = [r"BuilderFlag\.(FP16|INT8|FP8|BF16|INT4|FP4|OBEY_PRECISION_CONSTRAINTS|PREFER_PRECISION_CONSTRAINTS)",
               r"Int8\w*Calibrator", r"int8_calibrator", r"\.precision\s*=", r"set_output_type", r"EXPLICIT_BATCH",
               r"get_binding", r"binding_is_input", r"execute_async_v2", r"execute_v2", r"max_workspace_size",
               r"device_memory_size\b(?!_v2)", r"get_device_memory_size_for_profile\b", r"platform_has_fast"]
    sources = [*(REPO / "engine").glob("*.py"), REPO / "runtime/backends/tensorrt_backend.py"]
    for path in sources:
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        code = re.sub(r'"""(.|\n)*?"""', "", code)  # docstrings may name them
        for pattern in removed:
            assert not re.search(pattern, code), f"{path.name} uses {pattern}"


# ---------------------------------------------------------------------------------------------
# On a GPU with TensorRT
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_engines(tiny_export, tmp_path_factory):
    from osdiff.engine.build import build_engines

    out = tmp_path_factory.mktemp("tiny_engines")
    build_engines(tiny_export, out, [ShapeProfile.parse("1x128x128:1x128x192:2x256x256")], 2048, 1)
    return out


@pytest.mark.gpu
@needs_gpu
def test_build_records_machine_model_and_timing_cache(tiny_engines, tiny_export):
    from osdiff.engine.environment import current_gpu, tensorrt_version

    m = EngineManifest.read(tiny_engines)
    assert (m.tensorrt, m.gpu) == (tensorrt_version(), current_gpu())
    assert set(m.graphs) == set(json.loads((tiny_export / "manifest.json").read_text())["graphs"])
    assert m.graphs["denoiser"]["precision"] == "fp16" and m.graphs["entropy_anchor_0"]["precision"] == "fp32"
    assert (tiny_engines / "timing.cache").stat().st_size > 0
    assert all((tiny_engines / e["engine"]).stat().st_size > 0 for e in m.graphs.values())


@pytest.mark.gpu
@needs_gpu
def test_engines_match_onnxruntime(tiny_engines, tiny_export):
    from osdiff.engine.compare import compare

    assert compare(tiny_engines, tiny_export, ImageSize(1, 128, 192), min_psnr=35.0)


@pytest.mark.gpu
@needs_gpu
def test_codec_round_trip_and_cuda_graph_tail(tiny_engines, tiny_export, tiny_image):
    from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from osdiff.runtime.backends.tensorrt_backend import DECODE_TAIL, TensorRTBackend
    from osdiff.runtime.codec import Codec

    backend = TensorRTBackend(tiny_engines)
    codec = Codec(backend)
    data = codec.compress(tiny_image, seed=3)
    decoded = codec.decompress(data)
    reference = Codec(OnnxRuntimeBackend(tiny_export, precision="fp16")).decompress(data)  # same bits, other backend
    assert psnr(decoded, reference) > 30

    channels = json.loads((tiny_export / "manifest.json").read_text())["model"]["config"]["lfgcm"]["M"]
    y_hat = torch.randn(1, channels, 8, 12, device="cuda")
    x_T = torch.randn(1, 4, 16, 24, device="cuda")
    (y_c,) = backend.run(DECODE_TAIL[0], y_hat)
    (y_r,) = backend.run(DECODE_TAIL[1], y_c, x_T)
    (image,) = backend.run(DECODE_TAIL[2], y_r)
    expected = image.clone()
    for _ in range(3):  # run, capture, replay
        torch.testing.assert_close(backend.decode_tail(y_hat, x_T), expected)
    assert len(backend._tails) == 1


@pytest.mark.gpu
@needs_gpu
def test_loading_on_another_tensorrt_names_the_rebuild_command(tiny_engines, tmp_path):
    import shutil

    from osdiff.runtime.backends.tensorrt_backend import TensorRTBackend

    copy = tmp_path / "engines"
    shutil.copytree(tiny_engines, copy)
    m = EngineManifest.read(copy)
    m.tensorrt = "9.0.0"
    m.write(copy)
    with pytest.raises(EngineError, match="built with TensorRT 9.0.0") as e:
        TensorRTBackend(copy)
    assert str(e.value).endswith(m.rebuild_command(copy))
