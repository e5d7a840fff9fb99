"""Load on a Triton server of the codec: K concurrent clients x N requests each way, over
tritonclient's HTTP and gRPC (client i uses protocols[i % len(protocols)]).

Every client sends N compress and N decompress requests of a few fixed images, and checks every
answer against the in-process Codec on the same export, byte for byte (streams) and pixel for
pixel (images). Bad requests are interleaved (every --bad-every-th request of a client): garbage
bytes, a truncated stream, a stream of another model, a float image, a 4-channel image. Each
must come back as an error; a good request that fails is an unexpected error, except that with
the dynamic batcher on, a good request batched with a bad one fails too, with UNAVAILABLE (HTTP
503) and a message asking to send it again ("collateral", told apart by the message).

Reports p50/p99 latency per model and protocol, throughput (good requests per second), errors,
and the server's memory (resident set of its process tree: osdiff serve, tritonserver, the
Python-backend stubs) after a warm-up and after the load.

    python benchmarks/serve_load.py --engines DIR --start [--max-batch 0] --clients 4 --requests 50
    python benchmarks/serve_load.py --engines DIR --http localhost:8000 --grpc localhost:8001 --server-pid PID
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import click
import numpy as np

from osdiff.files import read_image
from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from osdiff.runtime.codec import Codec
from osdiff.serving.client import CodecClient, wait_ready
from osdiff.serving.models import COMPRESS, DECOMPRESS

DEFAULT_JSON = Path(__file__).parent / "results" / "serve_load_cpu.json"
COLLATERAL = "batched with another request that was bad"  # serving/proxy_model.py, UNAVAILABLE


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # "model/protocol" -> s
    good: int = 0
    mismatches: int = 0
    unexpected_errors: list[str] = field(default_factory=list)
    collateral_errors: int = 0
    bad_sent: int = 0
    bad_rejected: int = 0
    bad_accepted: list[str] = field(default_factory=list)  # a bad request that got an answer
    lock: threading.Lock = field(default_factory=threading.Lock)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_rss_mb(pid: int | None) -> float | None:
    """Resident memory of a process and all its descendants, MB."""
    if pid is None:
        return None
    import psutil

    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 1e6


def test_images(size: tuple[int, int], count: int) -> list[np.ndarray]:
    """Crops of the bundled picture at different offsets, so every image codes differently."""
    with resources.as_file(resources.files("osdiff") / "assets" / "demo.png") as path:
        picture = read_image(path)
    h, w = size
    if picture.shape[0] < h or picture.shape[1] < w:
        raise click.UsageError(f"--size {h}x{w} is larger than the bundled picture {picture.shape[0]}x{picture.shape[1]}")
    step_y = max(1, (picture.shape[0] - h) // count)
    step_x = max(1, (picture.shape[1] - w) // count)
    return [np.ascontiguousarray(picture[i * step_y : i * step_y + h, i * step_x : i * step_x + w]) for i in range(count)]


def other_model_stream(image: np.ndarray) -> bytes:
    """A genuine stream of another model: the small demo configuration with other random weights
    (cheap to build, whatever model the server runs)."""
    from osdiff.config import ModelConfig
    from osdiff.export.model import OSDiffModel
    from osdiff.runtime.backends.torch_backend import TorchBackend

    return Codec(TorchBackend(OSDiffModel.random(ModelConfig.demo(), seed=12345))).compress(image)


def bad_requests(stream: bytes, other: bytes, image: np.ndarray) -> list[tuple[str, str, dict[str, np.ndarray], str]]:
    """(kind, model, inputs, output) of requests that must fail."""
    as_stream = lambda b: {"stream": np.array([b], dtype=np.object_)}  # noqa: E731
    return [
        ("garbage bytes", DECOMPRESS, as_stream(os.urandom(64)), "image"),
        ("truncated stream", DECOMPRESS, as_stream(stream[: len(stream) // 2]), "image"),
        ("another model's stream", DECOMPRESS, as_stream(other), "image"),
        ("float32 image", COMPRESS, {"image": image.astype(np.float32)}, "stream"),
        ("4-channel image", COMPRESS, {"image": np.concatenate([image, image[..., :1]], axis=2)}, "stream"),
    ]


def client_loop(i: int, url: str, protocol: str, n: int, bad_every: int, images: list[np.ndarray], seeds: list[int],
                streams: list[bytes], decoded: list[np.ndarray], bad: list[Any], stats: Stats) -> None:
    with CodecClient(url, protocol) as client:
        for r in range(n):
            j = (i * n + r) % len(images)
            for model in (COMPRESS, DECOMPRESS):
                t0 = time.perf_counter()
                try:
                    if model == COMPRESS:
                        ok = client.compress(images[j], seeds[j]) == streams[j]
                    else:
                        ok = np.array_equal(client.decompress(streams[j]), decoded[j])
                except Exception as e:
                    with stats.lock:
                        if COLLATERAL in str(e):
                            stats.collateral_errors += 1
                        else:
                            stats.unexpected_errors.append(f"{model} over {protocol}: {str(e)[-300:]}")
                    continue
                with stats.lock:
                    stats.latencies[f"{model}/{protocol}"].append(time.perf_counter() - t0)
                    stats.good += 1
                    stats.mismatches += not ok
            if bad_every and (r + 1) % bad_every == 0:
                kind, model, inputs, output = bad[(i + r) % len(bad)]
                try:
                    client.infer(model, inputs, [output])
                    with stats.lock:
                        stats.bad_sent += 1
                        stats.bad_accepted.append(kind)
                except Exception:
                    with stats.lock:
                        stats.bad_sent += 1
                        stats.bad_rejected += 1


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1e3, q)) if values else float("nan")


@click.command()
@click.option("--engines", required=True, type=click.Path(exists=True, file_okay=False),
              help="The `osdiff export` directory the server serves (the in-process reference runs it too).")
@click.option("--start", is_flag=True, help="Start `osdiff serve --engines DIR` on free ports for the run.")
@click.option("--max-batch", default=0, show_default=True, help="With --start: the dynamic batcher's largest batch.")
@click.option("--queue-delay-us", default=0, show_default=True, help="With --start: the dynamic batcher's delay.")
@click.option("--instances", default=1, show_default=True, help="With --start: model instances.")
@click.option("--http", "http_url", default=None, help="host:port of a running server's HTTP endpoint.")
@click.option("--grpc", "grpc_url", default=None, help="host:port of a running server's gRPC endpoint.")
@click.option("--server-pid", type=int, default=None, help="A running server's process id, for its memory.")
@click.option("--clients", default=4, show_default=True)
@click.option("--requests", "n", default=50, show_default=True, help="Per client and model (each way).")
@click.option("--bad-every", default=5, show_default=True, help="A bad request after every k-th good pair (0: none).")
@click.option("--size", default="64x96", show_default=True, help="HxW of the test images.")
@click.option("--images", "count", default=8, show_default=True, help="Distinct test images.")
@click.option("--protocols", default="http,grpc", show_default=True)
@click.option("--ready-timeout", default=600.0, show_default=True, help="Seconds to wait for a started server.")
@click.option("--json", "json_path", default=str(DEFAULT_JSON), show_default=True)
def main(engines: str, start: bool, max_batch: int, queue_delay_us: int, instances: int, http_url: str | None,
         grpc_url: str | None, server_pid: int | None, clients: int, n: int, bad_every: int, size: str, count: int,
         protocols: str, ready_timeout: float, json_path: str) -> None:
    protocol_list = protocols.split(",")
    height, width = (int(v) for v in size.lower().split("x"))
    codec = Codec(OnnxRuntimeBackend(engines))
    images = test_images((height, width), count)
    seeds = list(range(count))
    streams = [codec.compress(im, s) for im, s in zip(images, seeds)]
    decoded = [codec.decompress(s) for s in streams]
    bad = bad_requests(streams[0], other_model_stream(images[0]), images[0])

    process = None
    if start:
        ports = [free_port() for _ in range(3)]
        http_url, grpc_url = f"localhost:{ports[0]}", f"localhost:{ports[1]}"
        command = [sys.executable, "-m", "osdiff.cli", "serve", "--engines", engines, "--http-port", str(ports[0]),
                   "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--max-batch", str(max_batch),
                   "--queue-delay-us", str(queue_delay_us), "--instances", str(instances)]
        log = tempfile.NamedTemporaryFile(prefix="serve_load_", suffix=".log", delete=False)
        click.echo(f"starting the server (log: {log.name}) ...", err=True)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        server_pid = process.pid
    urls = {"http": http_url, "grpc": grpc_url}
    missing = [p for p in protocol_list if not urls.get(p)]
    if missing:
        raise click.UsageError(f"give --start, or the server's URL for {', '.join(missing)}")
    try:
        if process is not None:
            wait_ready(str(http_url), ready_timeout, lambda: process is None or process.poll() is None)
        for p in protocol_list:  # warm-up: every instance's sessions get created
            with CodecClient(str(urls[p]), p) as c:
                for _ in range(instances):
                    c.decompress(c.compress(images[0], seeds[0]))
        rss_before = tree_rss_mb(server_pid)
        stats = Stats()
        threads = [threading.Thread(target=client_loop, args=(i, urls[protocol_list[i % len(protocol_list)]],
                                                              protocol_list[i % len(protocol_list)], n, bad_every,
                                                              images, seeds, streams, decoded, bad, stats))
                   for i in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rss_after = tree_rss_mb(server_pid)
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()

    rows = {key: {"n": len(v), "p50_ms": percentile_ms(v, 50), "p99_ms": percentile_ms(v, 99)}
            for key, v in sorted(stats.latencies.items())}
    result = {
        "command": " ".join(["python", "benchmarks/serve_load.py", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "engines": str(Path(engines).resolve()), "model": codec.cfg.name, "image_size": [height, width],
        "clients": clients, "requests_per_client_each_way": n, "protocols": protocol_list,
        "server": {"started_here": start, "max_batch": max_batch if start else None,
                   "queue_delay_us": queue_delay_us if start else None, "instances": instances if start else None},
        "latency": rows,
        "wall_s": wall, "throughput_rps": stats.good / wall,
        "good_requests": stats.good, "mismatches": stats.mismatches,
        "unexpected_errors": len(stats.unexpected_errors), "unexpected_error_messages": stats.unexpected_errors[:10],
        "collateral_errors": stats.collateral_errors,
        "bad_requests_sent": stats.bad_sent, "bad_requests_rejected": stats.bad_rejected,
        "bad_requests_accepted": stats.bad_accepted,
        "server_rss_mb_before": rss_before, "server_rss_mb_after": rss_after,
    }
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(result, indent=1))

    click.echo(f"{clients} clients x {n} requests each way, {height}x{width} images, {codec.cfg.name} model, "
               f"{wall:.1f} s, {stats.good / wall:.2f} good requests/s")
    click.echo(f"{'model/protocol':<28}{'n':>6}{'p50 ms':>10}{'p99 ms':>10}")
    for key, row in rows.items():
        click.echo(f"{key:<28}{row['n']:>6}{row['p50_ms']:>10.1f}{row['p99_ms']:>10.1f}")
    click.echo(f"mismatches {stats.mismatches}, unexpected errors {len(stats.unexpected_errors)}, collateral errors "
               f"{stats.collateral_errors}, bad requests rejected {stats.bad_rejected}/{stats.bad_sent}")
    if rss_before is not None and rss_after is not None:
        click.echo(f"server memory (RSS of its process tree): {rss_before:.0f} MB before, {rss_after:.0f} MB after "
                   f"({rss_after - rss_before:+.0f} MB)")
    for message in stats.unexpected_errors[:3]:
        click.echo(f"  unexpected: {message}")
    click.echo(f"wrote {json_path}")
    if stats.mismatches or stats.unexpected_errors or stats.bad_accepted:
        sys.exit(1)


if __name__ == "__main__":
    main()
