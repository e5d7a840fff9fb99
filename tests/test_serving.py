"""Serving on Triton: `osdiff serve` (PyTriton) started on localhost and used through tritonclient
over HTTP and gRPC, bad requests, metrics and a clean stop; `osdiff triton-repo` configs parsed by
Triton's ModelConfig protobuf, and its Python-backend variant loaded in PyTriton's tritonserver;
a small run of benchmarks/serve_load.py. Every answer is compared with the in-process Codec.

Needs the serve extra (`make install` installs it); skipped with the reason printed without it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

pytest.importorskip("pytriton", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("tritonclient.http", reason="the serve extra is not installed (pip install -e '.[serve]')")

import sysconfig  # noqa: E402

if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
    pytest.skip("this Python has no shared libpython, which Triton's Python backend needs", allow_module_level=True)

from osdiff.serving.client import CodecClient, wait_ready  # noqa: E402
from osdiff.serving.models import COMPRESS, DECOMPRESS  # noqa: E402
from conftest import free_ports  # noqa: E402

pytestmark = pytest.mark.slow
READY_TIMEOUT_S = 300  # a loaded 2-core machine imports torch in each Python-backend stub slowly


@pytest.fixture(scope="module")
def codec(tiny_export):
    from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from osdiff.runtime.codec import Codec

    return Codec(OnnxRuntimeBackend(tiny_export))


@pytest.fixture(scope="module")
def images(tiny_image):
    return [tiny_image, np.ascontiguousarray(tiny_image[:70, :100]), np.ascontiguousarray(tiny_image[::-1, :, ::-1])]


@pytest.fixture(scope="module")
def other_model_stream(tiny_config, tiny_image):
    """A genuine stream of another model (same architecture, other weights)."""
    from osdiff.export.model import OSDiffModel
    from osdiff.runtime.backends.torch_backend import TorchBackend
    from osdiff.runtime.codec import Codec

    return Codec(TorchBackend(OSDiffModel.random(tiny_config, seed=7))).compress(tiny_image)


class Server:
    """`osdiff serve` in a subprocess on free ports."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.log = log
        command = [sys.executable, "-m", "osdiff.cli", "serve", *args, "--http-port", str(self.http_port),
                   "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port)]
        self.process = subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        try:
            wait_ready(self.http, READY_TIMEOUT_S, lambda: self.process.poll() is None)
        except BaseException:
            self.process.kill()
            raise AssertionError(f"server did not come up:\n{log.read_text()[-3000:]}") from None

    http = property(lambda self: f"localhost:{self.http_port}")
    grpc = property(lambda self: f"localhost:{self.grpc_port}")

    def url(self, protocol: str) -> str:
        return self.http if protocol == "http" else self.grpc

    def stop(self) -> int:
        """SIGTERM, as Kubernetes stops a pod; returns the exit code."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"the server did not stop within 120 s:\n{self.log.read_text()[-3000:]}") from None


@pytest.fixture(scope="module")
def server(tiny_export, tmp_path_factory):
    s = Server(["--engines", str(tiny_export)], tmp_path_factory.mktemp("serve") / "server.log")
    yield s
    assert s.process.poll() is None, "the server died during the tests"
    assert s.stop() == 0, s.log.read_text()[-3000:]


# ---------------------------------------------------------------------------------------------
# osdiff serve
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_serve_matches_the_in_process_codec(server, codec, images, protocol):
    with CodecClient(server.url(protocol), protocol) as client:
        assert not client.batched
        for i, image in enumerate(images):
            stream = client.compress(image, seed=i)
            assert stream == codec.compress(image, seed=i)
            assert np.array_equal(client.decompress(stream), codec.decompress(stream))
        assert client.compress(images[0]) == codec.compress(images[0], seed=0)  # seed is optional


def test_health_and_metrics(server):
    assert urllib.request.urlopen(f"http://{server.http}/v2/health/ready").status == 200
    with CodecClient(server.http) as client:
        client.compress(np.zeros((20, 30, 3), np.uint8))
    metrics = urllib.request.urlopen(f"http://localhost:{server.metrics_port}/metrics").read().decode()
    assert 'nv_inference_request_success{model="osdiff_compress"' in metrics


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_get_errors_naming_the_problem(server, codec, images, other_model_stream, protocol):
    from tritonclient.utils import InferenceServerException

    image = images[1]
    stream = codec.compress(image)
    as_stream = lambda b: {"stream": np.array([b], dtype=np.object_)}  # noqa: E731
    cases = [
        (DECOMPRESS, as_stream(b"\x00garbage bytes" * 5), "image", "not an .osd stream"),
        (DECOMPRESS, as_stream(b""), "image", "truncated"),
        (DECOMPRESS, as_stream(stream[:-7]), "image", "Stream"),
        (DECOMPRESS, as_stream(other_model_stream), "image", "other model weights"),
        (DECOMPRESS, {"stream": np.frombuffer(stream, np.uint8).copy()}, "image", "data-type"),
        (DECOMPRESS, {"stream": np.array([stream, stream], dtype=np.object_)}, "image", "shape"),
        (COMPRESS, {"image": image.astype(np.float32)}, "stream", "data-type is 'FP32'"),
        (COMPRESS, {"image": image[..., 0].copy()}, "stream", "shape"),
        (COMPRESS, {"image": np.concatenate([image, image[..., :1]], axis=2)}, "stream", "shape"),
        (COMPRESS, {"image": np.zeros((0, 5, 3), np.uint8)}, "stream", "empty image"),
        (COMPRESS, {"image": image, "seed": np.array([1.5], np.float32)}, "stream", "data-type"),
        (COMPRESS, {"seed": np.array([1], np.uint32)}, "stream", "image"),
    ]
    with CodecClient(server.url(protocol), protocol) as client:
        for model, inputs, output, expected in cases:
            with pytest.raises(InferenceServerException) as e:
                client.infer(model, inputs, [output])
            assert expected in str(e.value), (model, {k: (v.dtype, v.shape) for k, v in inputs.items()}, str(e.value)[-500:])
        # and it keeps serving
        assert client.compress(image) == stream
        assert np.array_equal(client.decompress(stream), codec.decompress(stream))


def test_batching_server(tiny_export, codec, images, other_model_stream, tmp_path):
    """--max-batch: a leading batch dimension, concurrent requests batched (the metrics count
    fewer executions than inferences), client-side batches, results equal to the in-process codec."""
    s = Server(["--engines", str(tiny_export), "--max-batch", "4", "--queue-delay-us", "300000"], tmp_path / "server.log")
    try:
        image = images[0]
        expected = [codec.compress(image, seed=i) for i in range(4)]
        with CodecClient(s.http) as client:
            assert client.batched
            out = client.infer(COMPRESS, {"image": np.stack([image, image]), "seed": np.array([[0], [1]], np.uint32)},
                               ["stream"], batch_dim=False)["stream"]
            assert out.shape == (2, 1) and [bytes(x[0]) for x in out] == expected[:2]
            decoded = client.infer(DECOMPRESS, {"stream": np.array([[expected[0]], [expected[1]]], dtype=np.object_)},
                                   ["image"], batch_dim=False)["image"]
            assert decoded.shape == (2, *image.shape)
            assert np.array_equal(decoded[1], codec.decompress(expected[1]))

        results: dict[int, bytes] = {}

        def send(i: int) -> None:
            with CodecClient(s.grpc if i % 2 else s.http, "grpc" if i % 2 else "http") as c:
                results[i] = c.compress(image, seed=i)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [results[i] for i in range(4)] == expected
        metrics = urllib.request.urlopen(f"http://localhost:{s.metrics_port}/metrics").read().decode()
        count = _metric(metrics, "nv_inference_count", COMPRESS)
        executions = _metric(metrics, "nv_inference_exec_count", COMPRESS)
        assert count == 6 and executions < 5, (count, executions)

        with CodecClient(s.http) as client:  # a bad stream in a batch: an error naming it, then on serving
            from tritonclient.utils import InferenceServerException

            with pytest.raises(InferenceServerException, match="other model weights"):
                client.decompress(other_model_stream)
            assert np.array_equal(client.decompress(expected[2]), codec.decompress(expected[2]))
    finally:
        assert s.stop() == 0, s.log.read_text()[-3000:]


def _metric(text: str, name: str, model: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'{name}{{model="{model}"'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for {model} not in the metrics")


def test_serve_load_benchmark(server, tiny_export, tmp_path):
    """A small run of benchmarks/serve_load.py against the running server: 2 clients (HTTP and
    gRPC) x 3 requests each way, bad requests interleaved."""
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve_load.py"), "--engines", str(tiny_export),
                           "--http", server.http, "--grpc", server.grpc, "--server-pid", str(server.process.pid),
                           "--clients", "2", "--requests", "3", "--bad-every", "1", "--size", "64x96", "--images", "3",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["good_requests"] == 12 and result["mismatches"] == 0 and result["unexpected_errors"] == 0
    assert result["bad_requests_sent"] == 6 and result["bad_requests_rejected"] == 6
    assert set(result["latency"]) == {f"{m}/{p}" for m in (COMPRESS, DECOMPRESS) for p in ("http", "grpc")}
    assert result["server_rss_mb_before"] > 0 and result["server_rss_mb_after"] > 0
    assert "p50 ms" in proc.stdout


# ---------------------------------------------------------------------------------------------
# osdiff triton-repo
# ---------------------------------------------------------------------------------------------


def test_repository_configs_parse_as_triton_model_configs(tiny_export, tmp_path):
    from osdiff.export.onnx_export import ExportError
    from osdiff.serving.repository import RepositoryOptions, validate_repository, write_repository

    names = write_repository(tiny_export, tmp_path / "repo", RepositoryOptions(precision="fp16", max_batch=4))
    configs = validate_repository(tmp_path / "repo")
    assert set(configs) == set(names) == {COMPRESS, DECOMPRESS, "osdiff_vae_encoder", "osdiff_analysis",
                                          "osdiff_synthesis", "osdiff_denoiser", "osdiff_vae_decoder"}
    pb = sys.modules["tritonclient.grpc.model_config_pb2"]
    c = configs[COMPRESS]
    assert c.backend == "python" and c.max_batch_size == 0
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in c.input] == [
        ("image", pb.TYPE_UINT8, [-1, -1, 3], False), ("seed", pb.TYPE_UINT32, [1], True)]
    assert [(o.name, o.data_type, list(o.dims)) for o in c.output] == [("stream", pb.TYPE_STRING, [1])]
    assert c.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert c.parameters["remote_graphs"].string_value == "vae_encoder,analysis"
    d = configs[DECOMPRESS]
    assert [(i.name, i.data_type, list(i.dims)) for i in d.input] == [("stream", pb.TYPE_STRING, [1])]
    assert [(o.name, o.data_type, list(o.dims)) for o in d.output] == [("image", pb.TYPE_UINT8, [-1, -1, 3])]
    assert d.parameters["remote_graphs"].string_value == "synthesis,denoiser,vae_decoder"
    g = configs["osdiff_denoiser"]
    assert g.backend == "onnxruntime" and g.max_batch_size == 4 and g.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(i.name, list(i.dims)) for i in g.input] == [("y_c", [4, -1, -1]), ("x_T", [4, -1, -1])]
    assert g.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    assert (tmp_path / "repo/osdiff_denoiser/1/model.onnx").read_bytes() == \
        (tiny_export / manifest["graphs"]["denoiser"]["fp16"]["file"]).read_bytes()
    local = sorted(p.name for p in (tmp_path / "repo" / DECOMPRESS / "1" / "export" / "fp32").iterdir())
    assert local == sorted(f"{g}.onnx" for g in manifest["graphs"] if g.startswith(("entropy_", "hyper_")))

    with pytest.raises(ExportError, match="not empty"):
        write_repository(tiny_export, tmp_path / "repo")
    with pytest.raises(ExportError, match="manifest"):
        write_repository(tmp_path / "repo", tmp_path / "repo2")
    (tmp_path / "repo/osdiff_denoiser/config.pbtxt").write_text('name: "osdiff_denoiser"\nmax_batch: 4\n')
    with pytest.raises(ExportError, match="osdiff_denoiser/config.pbtxt: not a valid Triton model config"):
        validate_repository(tmp_path / "repo")


def test_repository_from_tensorrt_engines(tiny_export, tmp_path):
    """An `osdiff build` directory written by hand (no TensorRT here: the plans are placeholder
    bytes, so this checks our repository layout and configs, nothing about TensorRT)."""
    import shutil

    from osdiff.engine.manifest import MODEL_DIR, EngineManifest, Gpu
    from osdiff.serving.repository import validate_repository, write_repository

    manifest = json.loads((tiny_export / "manifest.json").read_text())
    build = tmp_path / "engines"
    (build / MODEL_DIR).mkdir(parents=True)
    shutil.copyfile(tiny_export / "manifest.json", build / MODEL_DIR / "manifest.json")
    shutil.copyfile(tiny_export / "entropy_bottleneck.safetensors", build / MODEL_DIR / "entropy_bottleneck.safetensors")
    graphs = {}
    for name, entry in manifest["graphs"].items():
        (build / f"{name}.engine").write_bytes(name.encode())
        graphs[name] = {"engine": f"{name}.engine", "inputs": entry["inputs"], "outputs": entry["outputs"],
                        "shapes": entry["shapes"]}
    EngineManifest("10.13", Gpu("H100", "9.0"), manifest["model"]["name"], manifest["model"]["fingerprint"],
                   str(tiny_export), ["1x64x64:1x128x192:2x256x256", "1x64x64:4x512x512:6x512x768"], 8192, 3,
                   graphs).write(build)
    write_repository(build, tmp_path / "repo")
    configs = validate_repository(tmp_path / "repo")
    assert len(configs) == len(manifest["graphs"]) + 2
    a = configs["osdiff_entropy_anchor_0"]
    assert a.platform == "tensorrt_plan" and a.max_batch_size == 6
    assert (tmp_path / "repo/osdiff_entropy_anchor_0/1/model.plan").read_bytes() == b"entropy_anchor_0"
    assert "entropy_anchor_0" in configs[DECOMPRESS].parameters["remote_graphs"].string_value.split(",")


def test_python_only_repository_in_pytritons_tritonserver(tiny_export, codec, images, other_model_stream, tmp_path):
    """The repository's Python-backend variant, loaded in the tritonserver that PyTriton bundles:
    codec models calling graph models over BLS, end to end, bit-identical to the in-process codec."""
    from pytriton.triton import Triton, TritonConfig
    from tritonclient.utils import InferenceServerException

    from osdiff.serving.repository import RepositoryOptions, write_repository
    from osdiff.serving.server import prepare_environment

    repo = tmp_path / "repo"
    write_repository(tiny_export, repo, RepositoryOptions(python_only=True, gpu=False, codec_instances=1))
    prepare_environment()
    http, grpc, metrics = free_ports(3)
    triton = Triton(config=TritonConfig(model_repository=repo, http_port=http, grpc_port=grpc, metrics_port=metrics,
                                        exit_timeout_secs=30))
    triton.run()
    try:
        wait_ready(f"localhost:{http}", READY_TIMEOUT_S)
        for protocol, port in (("http", http), ("grpc", grpc)):
            with CodecClient(f"localhost:{port}", protocol) as client:
                for i, image in enumerate(images[:2]):
                    stream = client.compress(image, seed=i)
                    assert stream == codec.compress(image, seed=i)
                    assert np.array_equal(client.decompress(stream), codec.decompress(stream))
                with pytest.raises(InferenceServerException, match="not an .osd stream"):
                    client.decompress(b"garbage")
                with pytest.raises(InferenceServerException, match="other model weights"):
                    client.decompress(other_model_stream)
                with pytest.raises(InferenceServerException, match="data-type"):
                    client.infer(COMPRESS, {"image": images[1].astype(np.float32)}, ["stream"])
                assert client.compress(images[1]) == codec.compress(images[1])
    finally:
        triton.stop()



def test_cli_triton_repo_and_serve_usage(tiny_export, tmp_path):
    from click.testing import CliRunner

    from osdiff.cli import main

    result = CliRunner().invoke(main, ["triton-repo", str(tiny_export), "-o", str(tmp_path / "repo"), "--python-only",
                                       "--cpu", "--max-batch", "0"])
    assert result.exit_code == 0, result.output
    assert "wrote 7 models" in result.output and (tmp_path / "repo/osdiff_vae_decoder/1/model.py").exists()
    assert "max_batch_size" not in (tmp_path / "repo/osdiff_vae_decoder/config.pbtxt").read_text()
    result = CliRunner().invoke(main, ["triton-repo", str(tiny_export), "-o", str(tmp_path / "repo")])
    assert result.exit_code == 1 and "not empty" in result.output
    result = CliRunner().invoke(main, ["serve", "--engines", str(tiny_export), "--device", "cpu,cpu"])
    assert result.exit_code == 2 and "several --device values need --backend torch" in result.output
