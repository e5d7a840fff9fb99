"""A fleet that survives: `osdiff serve` readiness that standard probes can trust, error responses
that name the problem and nothing else (HTTP and gRPC alike), bad input over the wire, and
`osdiff fleet` (HAProxy in front of replicas) balancing and surviving a SIGKILL, through a small
run of benchmarks/fleet.py. Servers run the built-in demo model (`--config demo`).

Needs the serve extra (PyTriton, tritonclient, Locust) and a shared libpython; the fleet needs
HAProxy (apt-get install haproxy). Skipped with the reason printed without them.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import REPO

pytest.importorskip("pytriton", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("tritonclient.grpc", reason="the serve extra is not installed (pip install -e '.[serve]')")
if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
    pytest.skip("this Python has no shared libpython, which Triton's Python backend needs", allow_module_level=True)

from osdiff.serving.client import CodecClient  # noqa: E402
from osdiff.serving.models import COMPRESS, DECOMPRESS  # noqa: E402
from conftest import free_ports  # noqa: E402

pytestmark = pytest.mark.slow
START_TIMEOUT_S = 300


def http_status(url: str) -> int:
    """The status of GET url; 0 when nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`osdiff serve --config demo` started here, with what the standard readiness endpoint said
    while it started: a list of (ready, compress model ready, decompress model ready, a request
    sent at that moment succeeded)."""
    http, grpc, metrics = free_ports(3)
    log = tmp_path_factory.mktemp("serve") / "server.log"
    process = subprocess.Popen([sys.executable, "-m", "osdiff.cli", "serve", "--config", "demo", "--max-pixels",
                                str(1 << 20), "--http-port", str(http), "--grpc-port", str(grpc),
                                "--metrics-port", str(metrics)], stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http}"
    polls = []
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            assert process.poll() is None, f"the server exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
            ready = http_status(f"{base}/v2/health/ready")
            poll = [ready, http_status(f"{base}/v2/models/{COMPRESS}/ready"),
                    http_status(f"{base}/v2/models/{DECOMPRESS}/ready"), http_status(f"{base}/v2/health/live")]
            if ready == 200:  # what a client that trusted the probe would do now
                with CodecClient(f"127.0.0.1:{http}") as c:
                    poll.append(len(c.compress(np.zeros((16, 16, 3), np.uint8))) > 0)
                polls.append(poll)
                break
            polls.append(poll)
            time.sleep(0.1)
        yield {"http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}", "base": base, "polls": polls,
               "process": process, "log": log}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()


def test_standard_readiness_waits_for_both_models(served):
    polls = served["polls"]
    assert len(polls) > 1, "the first probe already said ready: nothing was observed while starting"
    for ready, compress, decompress, live, *_ in polls[:-1]:
        assert ready != 200, polls
        assert live in (0, 200)  # liveness is separate: up as soon as the server answers
    ready, compress, decompress, live, served_ok = polls[-1]
    assert (ready, compress, decompress, live, served_ok) == (200, 200, 200, 200, True), polls
    assert http_status(f"{served['base']}/v2/health/live") == 200


def _error(client: CodecClient, model: str, inputs: dict[str, np.ndarray], output: str) -> tuple[str, str]:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as e:
        client.infer(model, inputs, [output])
    return str(e.value.status()), str(e.value.message())


def _assert_clean(message: str) -> None:
    for leak in ("Traceback", 'File "', ".py", "/work", "/root", "/tmp", "site-packages", "pytriton"):
        assert leak not in message, f"{leak!r} in the error message: {message}"


def _photo(h: int, w: int) -> np.ndarray:
    from osdiff.files import read_image
    from importlib import resources

    with resources.as_file(resources.files("osdiff") / "assets" / "demo.png") as path:
        return np.ascontiguousarray(read_image(path)[:h, :w])


def test_bad_stream_is_the_clients_fault_with_one_clean_message(served):
    """A bad stream: HTTP 400 and gRPC INVALID_ARGUMENT, the codec's message and nothing else,
    the same text on both protocols."""
    as_stream = {"stream": np.array([b"\x00garbage bytes" * 5], dtype=np.object_)}
    with CodecClient(served["http"], "http") as h, CodecClient(served["grpc"], "grpc") as g:
        http_status_, http_message = _error(h, DECOMPRESS, as_stream, "image")
        grpc_status_, grpc_message = _error(g, DECOMPRESS, as_stream, "image")
    assert http_status_ == "400" and grpc_status_ == "StatusCode.INVALID_ARGUMENT"
    assert http_message == grpc_message == "StreamError: not an .osd stream (bad magic bytes)"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_input_over_the_wire(served, protocol):
    from osdiff.config import ModelConfig
    from osdiff.export.model import OSDiffModel
    from osdiff.runtime.backends.torch_backend import TorchBackend
    from osdiff.runtime.codec import Codec

    image = _photo(64, 96)
    url = served["http"] if protocol == "http" else served["grpc"]
    with CodecClient(url, protocol) as client:
        stream = client.compress(image)
        decoded = client.decompress(stream)
        forged = bytearray(stream)
        forged[-5] ^= 0x5A  # inside the entropy-coded data: the check value no longer holds
        other = Codec(TorchBackend(OSDiffModel.random(ModelConfig.demo(), seed=12345))).compress(image)
        as_stream = lambda b: {"stream": np.array([b], dtype=np.object_)}  # noqa: E731
        cases = [  # (model, inputs, output, expected status, expected text)
            (COMPRESS, {"image": image.astype(np.float32)}, "stream", "400", "data-type is 'FP32'"),
            (COMPRESS, {"image": image[..., :2].copy()}, "stream", "400", "shape"),
            (COMPRESS, {"seed": np.array([1], np.uint32)}, "stream", "400", "the request has no input 'image'"),
            (DECOMPRESS, {"stream": np.frombuffer(stream, np.uint8).copy()}, "image", "400", "data-type"),
            (DECOMPRESS, as_stream(b""), "image", "400", "StreamError"),
            (DECOMPRESS, as_stream(bytes(forged)), "image", "400", "StreamError"),
            (DECOMPRESS, as_stream(other), "image", "400", "other model weights"),
            (COMPRESS, {"image": np.zeros((1025, 1025, 3), np.uint8)}, "stream", "400", "pixel limit"),
        ]
        for model, inputs, output, status, text in cases:
            got_status, message = _error(client, model, inputs, output)
            if protocol == "grpc":
                status = {"400": "StatusCode.INVALID_ARGUMENT"}[status]
            assert got_status == status and text in message, (model, text, got_status, message)
            _assert_clean(message)
            # and the replica goes on serving
            assert client.compress(image) == stream
        assert np.array_equal(client.decompress(stream), decoded)


def test_a_64_megapixel_request_is_refused_and_the_server_goes_on(served):
    """8192 x 8192 x 3 bytes (192 MiB) over HTTP: refused by the pixel limit, before any work."""
    image = _photo(64, 96)
    with CodecClient(served["http"], "http") as client:
        big = np.zeros((8192, 8192, 3), np.uint8)
        status, message = _error(client, COMPRESS, {"image": big}, "stream")
        del big
        assert status == "400" and "8192x8192 exceeds the 1048576-pixel limit" in message, message
        _assert_clean(message)
        assert len(client.compress(image)) > 0
    assert served["process"].poll() is None


def test_internal_errors_tell_the_client_an_incident_id_only(caplog):
    from osdiff.serving.models import RequestError, error_report

    report = error_report(RuntimeError("boom in /opt/secret/module.py"))
    assert report["code"] == "INTERNAL" and report["request"] is None
    assert "boom" not in report["message"] and "/opt" not in report["message"]
    incident = report["message"].split()[3]
    assert any(incident in r.getMessage() and r.exc_info for r in caplog.records)  # logged in full on the server
    assert error_report(RequestError("StreamError: truncated", 2)) == {
        "code": "INVALID_ARG", "message": "StreamError: truncated", "request": 2}


# ---------------------------------------------------------------------------------------------
# osdiff fleet
# ---------------------------------------------------------------------------------------------


def test_fleet_balances_and_survives_a_sigkill(tmp_path):
    """benchmarks/fleet.py, small: 2 replicas behind HAProxy, Locust over HTTP and gRPC; r0 gets
    SIGKILL mid-run and comes back, r1 is drained; every answer is checked."""
    if shutil.which("haproxy") is None:
        pytest.skip("HAProxy is not installed (apt-get install haproxy)")
    pytest.importorskip("locust", reason="Locust is not installed (the serve extra)")
    out = tmp_path / "fleet.json"
    base = free_ports(1)[0] // 16 * 16 + 8  # the benchmark takes base-4 .. base+5
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fleet.py"), "--replicas", "2",
                           "--concurrency", "2", "--requests", "20", "--chaos-concurrency", "2", "--kill-after", "4",
                           "--chaos-s", "1", "--base-port", str(base), "--json", str(out)],
                          capture_output=True, text=True, timeout=1200)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mismatches"] == 0 and result["answers_checked"] > 40
    # balanced: every replica served requests over both protocols
    per_server = result["haproxy_log"]["requests_per_backend_server"]
    assert all(per_server.get(f"{b}/r{i}", 0) > 0 for b in ("http", "grpc") for i in range(2)), per_server
    assert all(sum(counts.values()) > 0 for counts in result["soak"]["served_by_replica"].values())
    chaos = result["chaos"]
    assert chaos["killed"]["back_in_rotation_s"] is not None and chaos["drained"]["back_in_rotation_s"] is not None
    assert chaos["load"]["checking_client"]["round_trips"] > 0 and chaos["load"]["checking_client"]["mismatches"] == 0
    assert chaos["failed_not_in_flight_at_kill"] == 0, chaos["failed_requests"]
    assert result["failed_after_client_retry"] == 0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_osdiff_fleet_command(tmp_path):
    """`osdiff fleet --replicas 1 -- --config demo`: serves through HAProxy, drains and exits on
    SIGTERM, leaving no process behind."""
    import psutil

    if shutil.which("haproxy") is None:
        pytest.skip("HAProxy is not installed (apt-get install haproxy)")
    http, grpc, stats = free_ports(3)
    base = free_ports(1)[0] // 16 * 16 + 8
    log = tmp_path / "fleet.log"
    process = subprocess.Popen([sys.executable, "-m", "osdiff.cli", "fleet", "--replicas", "1", "--http-port", str(http),
                                "--grpc-port", str(grpc), "--stats-port", str(stats), "--base-port", str(base),
                                "--workdir", str(tmp_path / "fleet"), "--", "--config", "demo"],
                               stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "fleet of 1" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        children = psutil.Process(process.pid).children(recursive=True)
        names = {c.name() for c in children}
        assert "haproxy" in names and "tritonserver" in names, names
        image = _photo(32, 48)
        with CodecClient(f"127.0.0.1:{http}", "http") as h, CodecClient(f"127.0.0.1:{grpc}", "grpc") as g:
            stream = h.compress(image)
            assert g.compress(image) == stream and np.array_equal(h.decompress(stream), g.decompress(stream))
        assert http_status(f"http://127.0.0.1:{stats}/metrics") == 200
        assert "osdiff-replicas" in (tmp_path / "fleet" / "prometheus.yml").read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=180)
    assert code == 0, log.read_text()[-3000:]
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE], children
