"""Serving commands: a Triton server in one process, and a Triton model repository for a fleet."""

from __future__ import annotations

import logging
from typing import Any

import click

from osdiff.cli.common import backend_options, open_codec, user_errors

@click.command()
@click.option("--http-port", default=8000, show_default=True)
@click.option("--grpc-port", default=8001, show_default=True)
@click.option("--metrics-port", default=8002, show_default=True, help="Prometheus metrics at /metrics.")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(min=1),
              help="Model instances per device, each with its own backend (and copy of the model).")
@click.option("--max-batch", default=0, show_default=True, type=click.IntRange(min=0),
              help="Dynamic batcher's largest batch; 0: no batching (and no batch dimension).")
@click.option("--queue-delay-us", default=0, show_default=True, type=click.IntRange(min=0),
              help="How long the dynamic batcher waits to fill a batch, microseconds.")
@click.option("--max-pixels", default=16 * 1024 * 1024, show_default=True, type=click.IntRange(min=1),
              help="Largest image a request may carry (padded height x width); larger ones are refused.")
@backend_options
@user_errors
def serve(http_port: int, grpc_port: int, metrics_port: int, instances: int, max_batch: int, queue_delay_us: int,
          max_pixels: int, device: str, **options: Any) -> None:
    """Serve osdiff_compress and osdiff_decompress on Triton Inference Server (PyTriton; needs the
    serve extra). --device takes a comma-separated list for the torch backend: --instances per device."""
    from osdiff.serving.server import ServeError, ServeOptions, serve_forever, start

    devices = device.split(",")
    if len(devices) > 1 and (options["backend"] or ("onnxruntime" if options["engines"] else "torch")) != "torch":
        raise click.UsageError("several --device values need --backend torch")
    codecs = [open_codec(device=d, max_pixels=max_pixels, **options) for d in devices for _ in range(instances)]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        triton = start(codecs, ServeOptions(http_port, grpc_port, metrics_port, max_batch, queue_delay_us))
    except ServeError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"serving {len(codecs)} instance(s) of osdiff_compress and osdiff_decompress: HTTP :{http_port}, "
               f"gRPC :{grpc_port}, metrics :{metrics_port}/metrics; readiness /v2/health/ready, liveness "
               "/v2/health/live; SIGTERM or Ctrl-C stops after the requests in flight", err=True)
    serve_forever(triton)


@click.command("triton-repo")
@click.argument("engines", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Repository folder (new or empty).")
@click.option("--python-only", is_flag=True,
              help="Graph models on the Python backend (ONNX Runtime, CPU), for tritonservers without the "
                   "onnxruntime backend, such as PyTriton's.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="ONNX variant of the heavy graphs (an error where the export lacks it; int8: calibrated by "
                   "`osdiff calibrate`); the LFGCM graphs are fp32 by design.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=0),
              help="Dynamic batcher of the graph models (TensorRT: the engines' profiles decide).")
@click.option("--queue-delay-us", default=500, show_default=True, type=click.IntRange(min=0))
@click.option("--cpu", is_flag=True, help="Graph models on CPU instances (default: GPU; TensorRT: always GPU).")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(min=1), help="Per graph model and GPU.")
@click.option("--codec-instances", default=2, show_default=True, type=click.IntRange(min=1),
              help="CPU instances of osdiff_compress and of osdiff_decompress (entropy coding).")
@user_errors
def triton_repo(engines: str, output: str, python_only: bool, precision: str, max_batch: int, queue_delay_us: int,
                cpu: bool, instances: int, codec_instances: int) -> None:
    """Write a Triton model repository from an `osdiff export` (ONNX) or `osdiff build` (TensorRT)
    directory: osdiff_compress and osdiff_decompress (Python backend) over one model per heavy graph."""
    from osdiff.serving.repository import RepositoryOptions, write_repository

    names = write_repository(engines, output, RepositoryOptions(python_only, precision, max_batch, queue_delay_us,
                                                                not cpu, instances, codec_instances))
    click.echo(f"wrote {len(names)} models to {output} (every config.pbtxt parsed by Triton's ModelConfig): "
               + ", ".join(names))


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--replicas", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--http-port", default=8000, show_default=True, help="The balancer's HTTP port.")
@click.option("--grpc-port", default=8001, show_default=True, help="The balancer's gRPC port.")
@click.option("--stats-port", default=8404, show_default=True,
              help="HAProxy's statistics (/stats) and Prometheus metrics (/metrics).")
@click.option("--base-port", default=9000, show_default=True,
              help="Replica i listens on base+3i (HTTP), +1 (gRPC), +2 (metrics).")
@click.option("--workdir", default="osdiff-fleet", show_default=True, type=click.Path(file_okay=False),
              help="Where haproxy.cfg, prometheus.yml and the logs go.")
@click.argument("serve_args", nargs=-1, type=click.UNPROCESSED)
def fleet(replicas: int, http_port: int, grpc_port: int, stats_port: int, base_port: int, workdir: str,
          serve_args: tuple[str, ...]) -> None:
    """N `osdiff serve` replicas behind HAProxy (HTTP and gRPC, health-checked on readiness),
    restarted when they exit. SERVE_ARGS after `--` go to every `osdiff serve`, e.g.
    `osdiff fleet --replicas 3 -- --config demo`. Needs HAProxy (apt-get install haproxy)."""
    from pathlib import Path

    from osdiff.serving.fleet import FleetError, FleetOptions, serve_until_signal

    options = FleetOptions(replicas, list(serve_args), Path(workdir), http_port=http_port, grpc_port=grpc_port,
                           stats_port=stats_port, base_port=base_port)
    click.echo(f"starting {replicas} replica(s) (logs in {workdir}) ...", err=True)
    try:
        serve_until_signal(options, lambda line: click.echo(line, err=True))
    except FleetError as e:
        raise click.ClickException(str(e)) from e


COMMANDS = [serve, triton_repo, fleet]
