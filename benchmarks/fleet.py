"""Chaos benchmark of a fleet (serving/fleet.py): `osdiff serve` replicas behind HAProxy, loaded by
Locust (users driving tritonclient over HTTP and gRPC through the balancer, real photos as inputs),
while one replica is killed (SIGKILL to its process group) and restarted, and another is drained
(SIGTERM).

Phases:
  warm-up   every replica serves a few requests of every input
  soak      the load at each of --concurrency (c users, half HTTP, half gRPC), --requests each
            (>= 2,000 in all): throughput, p50/p99 per concurrency; RSS of every replica's process
            tree before and after
  chaos     the load at --chaos-concurrency: after --kill-after s replica r0 gets SIGKILL (the fleet
            starts it again; the time until HAProxy has it back in rotation is measured), once it
            is back replica r1 gets SIGTERM (it drains and exits, and is started again)

Every answer (stream bytes, image pixels) is compared with the in-process codec's, computed
before the load; a checking client (one more Locust user, HTTP and gRPC in turn) sends round
trips beside the load: compress, then decompress what came back. A failed request is retried
once by the client (after 0.5 s): reported are the failures without retry (with their reason and
when they happened relative to the kill and the drain) and those left after the retry.

    python benchmarks/fleet.py                       # 3 replicas of the built-in demo model
    python benchmarks/fleet.py --replicas 2 --concurrency 2 --requests 20 --chaos-s 0 --json out.json

Writes benchmarks/results/fleet_cpu.json; exit code 1 when a target is missed (a mismatch, a
failure left after the client's retry, a replica not back, RSS growth >= 5 %).
"""

from __future__ import annotations

# Locust patches the standard library for gevent on import: first, before anything opens sockets
from locust import User, constant, events, task  # isort: skip
from locust.env import Environment  # isort: skip

import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import gevent
import numpy as np

from osdiff.serving.fleet import Fleet, FleetOptions, Replica
from osdiff.serving.models import COMPRESS, DECOMPRESS

DEFAULT_JSON = Path(__file__).parent / "results" / "fleet_cpu.json"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # scikit-image's bundled photographs


@dataclass
class Record:
    start: float  # time.monotonic()
    end: float
    name: str  # "<model>/<protocol>", "check/<protocol>"
    ok: bool
    error: str = ""
    retry_ok: bool | None = None  # None: not retried (ok at once)
    mismatch: bool = False


@dataclass
class Shared:
    """What every Locust user reads and writes (one gevent thread: no locks)."""
    images: list[np.ndarray] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    streams: list[bytes] = field(default_factory=list)
    decoded: list[np.ndarray] = field(default_factory=list)
    http: str = ""
    grpc: str = ""
    records: list[Record] = field(default_factory=list)


SHARED = Shared()


def photos(size: tuple[int, int]) -> list[np.ndarray]:
    """scikit-image's photographs, resized to height x width (Lanczos)."""
    from PIL import Image
    from skimage import data

    h, w = size
    return [np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB").resize((w, h), Image.LANCZOS))
            for name in PHOTOS]


def client(protocol: str) -> Any:
    from osdiff.serving.client import CodecClient

    return CodecClient(SHARED.http if protocol == "http" else SHARED.grpc, protocol, timeout_s=120)


def short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:200]}"


class CodecUser(User):
    """Alternates compress and decompress of the photos; compares every answer with the
    in-process codec's; retries a failed request once."""

    abstract = True
    protocol = "http"
    wait_time = constant(0)

    def on_start(self) -> None:
        self.codec = client(self.protocol)
        self.i = random.randrange(len(SHARED.images))

    def on_stop(self) -> None:
        self.codec.close()

    def call(self, model: str, j: int) -> bool:
        """One request; True when the answer is the in-process codec's."""
        if model == COMPRESS:
            return bool(self.codec.compress(SHARED.images[j], SHARED.seeds[j]) == SHARED.streams[j])
        return bool(np.array_equal(self.codec.decompress(SHARED.streams[j]), SHARED.decoded[j]))

    @task
    def request(self) -> None:
        self.i += 1
        j = self.i % len(SHARED.images)
        model = COMPRESS if self.i % 2 else DECOMPRESS
        name = f"{model}/{self.protocol}"
        t0 = time.monotonic()
        try:
            same = self.call(model, j)
        except Exception as e:
            t1 = time.monotonic()
            events.request.fire(request_type=self.protocol, name=model, response_time=(t1 - t0) * 1e3,
                                response_length=0, exception=e)
            record = Record(t0, t1, name, False, short(e))
            gevent.sleep(0.5)
            try:
                record.retry_ok = self.call(model, j)
                record.mismatch = not record.retry_ok
            except Exception as e2:
                record.retry_ok = False
                record.error += f"; retry: {short(e2)}"
            SHARED.records.append(record)
            return
        t1 = time.monotonic()
        events.request.fire(request_type=self.protocol, name=model, response_time=(t1 - t0) * 1e3, response_length=0,
                            exception=None if same else AssertionError("mismatch"))
        SHARED.records.append(Record(t0, t1, name, same, "" if same else "mismatch", mismatch=not same))


class HttpUser(CodecUser):
    protocol = "http"


class GrpcUser(CodecUser):
    protocol = "grpc"


class CheckingUser(User):
    """The checking client: round trips (compress, then decompress the stream that came back),
    HTTP and gRPC in turn, each answer compared with the in-process codec's."""

    fixed_count = 1
    wait_time = constant(0)

    def on_start(self) -> None:
        self.clients = {p: client(p) for p in ("http", "grpc")}
        self.n = 0

    def on_stop(self) -> None:
        for c in self.clients.values():
            c.close()

    @task
    def round_trip(self) -> None:
        self.n += 1
        protocol = "http" if self.n % 2 else "grpc"
        j = self.n % len(SHARED.images)
        t0 = time.monotonic()
        try:
            stream = self.clients[protocol].compress(SHARED.images[j], SHARED.seeds[j])
            same = stream == SHARED.streams[j] and np.array_equal(self.clients[protocol].decompress(stream),
                                                                   SHARED.decoded[j])
        except Exception as e:
            SHARED.records.append(Record(t0, time.monotonic(), f"check/{protocol}", False, short(e), retry_ok=None))
            gevent.sleep(0.5)
            return
        SHARED.records.append(Record(t0, time.monotonic(), f"check/{protocol}", same, "" if same else "mismatch",
                                     mismatch=not same))


def tree_rss_mb(pid: int | None) -> float | None:
    """Resident memory of a process and its descendants (osdiff serve, tritonserver, stubs), MB."""
    import psutil

    if pid is None:
        return None
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 1e6


def served_by_replica(fleet: Fleet) -> dict[str, dict[str, float]]:
    """Successful inferences per replica and model since the replica (last) started, from its
    Prometheus metrics (parsed with prometheus_client)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {}
    for r in fleet.replicas:
        counts = {}
        for family in text_string_to_metric_families(r.metrics()):
            if family.name == "nv_inference_request_success":
                for s in family.samples:
                    counts[s.labels["model"]] = s.value
        out[r.name] = counts
    return out


def run_load(env: Environment, users: int, until: Any, timeout_s: float) -> dict[str, Any]:
    """Run `users` Locust users (plus the checking client) until until() or timeout_s; Locust's
    numbers for the phase."""
    env.stats.reset_all()
    runner = env.runner
    assert runner is not None
    first = len(SHARED.records)
    t0 = time.monotonic()
    runner.start(users + 1, spawn_rate=100)
    while not until() and time.monotonic() - t0 < timeout_s:
        gevent.sleep(0.25)
    runner.stop()
    wall = time.monotonic() - t0
    total = env.stats.total
    records = SHARED.records[first:]
    return {
        "users": users, "wall_s": round(wall, 2), "requests": total.num_requests, "failures": total.num_failures,
        "throughput_rps": round(total.num_requests / wall, 3),
        "p50_ms": total.get_response_time_percentile(0.5), "p99_ms": total.get_response_time_percentile(0.99),
        "per_request": {f"{e.method}/{e.name}": {"n": e.num_requests, "p50_ms": e.get_response_time_percentile(0.5),
                                                 "p99_ms": e.get_response_time_percentile(0.99)}
                        for e in env.stats.entries.values()},
        "checking_client": {"round_trips": sum(r.name.startswith("check/") for r in records),
                            "failed": sum(r.name.startswith("check/") and not r.ok for r in records),
                            "mismatches": sum(r.name.startswith("check/") and r.mismatch for r in records)},
        "mismatches": sum(r.mismatch for r in records),
        "records": (first, len(SHARED.records)),
    }


def haproxy_log_summary(path: Path, since: str | None = None) -> dict[str, Any]:
    """Requests per replica, retried requests and abnormal terminations from HAProxy's log."""
    # httplog: ... [date] frontend backend/server timers status bytes - - termination ac/fc/bc/sc/retries
    line = re.compile(r"\] (http|grpc) (\w+)/(\S+) [-\d/]+ (\d+) \d+ \S+ \S+ (\S{4}) \d+/\d+/\d+/\d+/\+?(\d+) ")
    per_server: Counter[str] = Counter()
    retried = 0
    terminations: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    for text in path.read_text(errors="replace").splitlines():
        m = line.search(text)
        if not m:
            continue
        _, backend, server, status, term, retries = m.groups()
        per_server[f"{backend}/{server}"] += 1
        statuses[status] += 1
        retried += int(retries) > 0
        if not term.startswith("--"):
            terminations[term] += 1
    return {"requests_per_backend_server": dict(per_server), "retried_by_haproxy": retried,
            "abnormal_terminations": dict(terminations), "status_codes": dict(statuses)}


@click.command()
@click.option("--replicas", default=3, show_default=True)
@click.option("--serve-args", default="--config demo", show_default=True, help="For every `osdiff serve`.")
@click.option("--concurrency", default="2,4,8", show_default=True, help="Locust users per soak phase.")
@click.option("--requests", "per_phase", default=700, show_default=True, help="Requests per soak phase.")
@click.option("--chaos-concurrency", default=4, show_default=True)
@click.option("--kill-after", default=8.0, show_default=True, help="Seconds into the chaos phase.")
@click.option("--chaos-s", default=1.0, show_default=True, help="0: no chaos phase; else run on for this long after the last replica is back.")
@click.option("--size", default="64x96", show_default=True, help="HxW of the photos.")
@click.option("--base-port", default=19500, show_default=True)
@click.option("--balancer-retries", default=3, show_default=True, help="HAProxy's tries on other replicas (0: none).")
@click.option("--json", "json_path", default=str(DEFAULT_JSON), show_default=True)
def main(replicas: int, serve_args: str, concurrency: str, per_phase: int, chaos_concurrency: int, kill_after: float,
         chaos_s: float, size: str, base_port: int, balancer_retries: int, json_path: str) -> None:
    import grpc.experimental.gevent as grpc_gevent

    grpc_gevent.init_gevent()  # gRPC calls yield to the other Locust users
    from osdiff.builtin import load_builtin
    from osdiff.runtime.backends.torch_backend import TorchBackend
    from osdiff.runtime.codec import Codec

    if "--config demo" not in serve_args or "--random-weights" in serve_args or "--engines" in serve_args:
        raise click.UsageError("the in-process reference is the built-in demo model: --serve-args must serve it")
    height, width = (int(v) for v in size.lower().split("x"))
    codec = Codec(TorchBackend(load_builtin()))
    SHARED.images = photos((height, width))
    SHARED.seeds = list(range(len(SHARED.images)))
    SHARED.streams = [codec.compress(im, s) for im, s in zip(SHARED.images, SHARED.seeds)]
    SHARED.decoded = [codec.decompress(s) for s in SHARED.streams]
    del codec

    workdir = Path(tempfile.mkdtemp(prefix="osdiff-fleet-bench-"))
    ports = {"http_port": base_port - 4, "grpc_port": base_port - 3, "stats_port": base_port - 2}
    options = FleetOptions(replicas, serve_args.split(), workdir, address="127.0.0.1", base_port=base_port,
                           balancer_retries=balancer_retries, **ports)
    fleet = Fleet(options)
    click.echo(f"starting {replicas} replicas (logs in {workdir}) ...", err=True)
    t_start = time.monotonic()
    fleet.start()
    startup_s = time.monotonic() - t_start
    SHARED.http, SHARED.grpc = fleet.http, fleet.grpc
    result: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/fleet.py", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu": _cpu_model()},
        "replicas": replicas, "serve_args": serve_args, "balancer": "HAProxy " + _haproxy_version(),
        "balancer_retries": balancer_retries,
        "inputs": {"photos": [f"skimage.data.{p}" for p in PHOTOS], "size": [height, width]},
        "load_generator": "Locust (users driving tritonclient over HTTP and gRPC)", "fleet_startup_s": round(startup_s, 1),
    }
    env = Environment(user_classes=[HttpUser, GrpcUser, CheckingUser], events=events)
    env.create_local_runner()
    try:
        # warm-up: every replica's models see every input (allocator caches settle before the RSS)
        with client("http") as c:
            for _ in range(2 * replicas):
                for j in range(len(SHARED.images)):
                    c.decompress(c.compress(SHARED.images[j], SHARED.seeds[j]))
        rss_before = {r.name: tree_rss_mb(r.pid) for r in fleet.replicas}
        pids_before = {r.name: r.pid for r in fleet.replicas}
        soak = []
        for users in (int(c) for c in concurrency.split(",")):
            click.echo(f"soak: {users} users, {per_phase} requests ...", err=True)
            phase = run_load(env, users, lambda: env.stats.total.num_requests >= per_phase, timeout_s=3600)
            soak.append(phase)
            click.echo(f"  {phase['throughput_rps']:.2f} req/s, p50 {phase['p50_ms']} ms, p99 {phase['p99_ms']} ms, "
                       f"failures {phase['failures']}, mismatches {phase['mismatches']}", err=True)
        rss_after = {r.name: tree_rss_mb(r.pid) for r in fleet.replicas}
        restarted = [n for n, p in pids_before.items() if fleet.replicas[int(n[1:])].pid != p]
        result["soak"] = {"phases": soak, "requests": sum(p["requests"] for p in soak),
                          "rss_mb_before": rss_before, "rss_mb_after": rss_after,
                          "rss_growth_pct": {n: round(100 * (rss_after[n] / rss_before[n] - 1), 2)
                                             for n in rss_before if rss_before[n] and rss_after[n]},
                          "replicas_restarted_during_soak": restarted,
                          "served_by_replica": served_by_replica(fleet)}
        if chaos_s > 0 and replicas >= 2:
            result["chaos"] = chaos(env, fleet, chaos_concurrency, kill_after, chaos_s)
        result["haproxy_log"] = haproxy_log_summary(workdir / "haproxy.log")
    finally:
        env.runner.quit() if env.runner else None
        fleet.stop()
    result["mismatches"] = sum(r.mismatch for r in SHARED.records)
    result["answers_checked"] = len(SHARED.records)
    failed_after_retry = [r for r in SHARED.records if not r.ok and r.retry_ok is False]
    result["failed_after_client_retry"] = len(failed_after_retry)
    result["fleet_events"] = [(round(t - t_start, 2), name, what) for t, name, what in fleet.events]
    result["workdir"] = str(workdir)
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(result, indent=1, default=str))
    report(result)
    click.echo(f"wrote {json_path}")
    growth = result["soak"]["rss_growth_pct"].values()
    chaos_ok = "chaos" not in result or (result["chaos"]["killed"]["back_in_rotation_s"] is not None
                                         and result["chaos"]["drained"]["back_in_rotation_s"] is not None)
    if result["mismatches"] or failed_after_retry or not chaos_ok or any(g >= 5 for g in growth):
        sys.exit(1)


def chaos(env: Environment, fleet: Fleet, users: int, kill_after: float, run_on_s: float) -> dict[str, Any]:
    killed, drained = fleet.replicas[0], fleet.replicas[1]
    times: dict[str, float] = {}

    def scenario() -> None:
        gevent.sleep(kill_after)
        times["kill"] = time.monotonic()
        killed.kill()
        times["killed_back"] = back_in_rotation(fleet, killed, times["kill"])
        gevent.sleep(3)
        times["term"] = time.monotonic()
        process = drained.process  # the fleet starts a new one once it exits
        drained.terminate()
        while process is not None and process.poll() is None:
            gevent.sleep(0.1)
        times["drained_exit"] = time.monotonic()
        times["drained_back"] = back_in_rotation(fleet, drained, times["term"])
        gevent.sleep(run_on_s)
        times["end"] = time.monotonic()

    click.echo(f"chaos: {users} users; SIGKILL {killed.name} after {kill_after:.0f} s, then SIGTERM {drained.name} ...",
               err=True)
    g = gevent.spawn(scenario)
    phase = run_load(env, users, lambda: "end" in times, timeout_s=1800)
    g.kill()
    first, last = phase.pop("records")
    records = SHARED.records[first:last]
    t_kill, t_term = times.get("kill", float("nan")), times.get("term", float("nan"))
    failures = [{"name": r.name, "start_s": round(r.start - t_kill, 2), "end_s": round(r.end - t_kill, 2),
                 "in_flight_at_kill": r.start <= t_kill <= r.end, "in_flight_at_sigterm": r.start <= t_term <= r.end,
                 "error": r.error, "client_retry_ok": r.retry_ok} for r in records if not r.ok]
    out = {
        "load": phase,
        "killed": {"replica": killed.name, "signal": "SIGKILL to its process group",
                   "back_in_rotation_s": _since(times, "killed_back", "kill")},
        "drained": {"replica": drained.name, "signal": "SIGTERM to osdiff serve",
                    "exit_after_s": _since(times, "drained_exit", "term"),
                    "back_in_rotation_s": _since(times, "drained_back", "term")},
        "failed_requests": failures,
        "failed_not_in_flight_at_kill": sum(not f["in_flight_at_kill"] for f in failures),
        "failed_after_client_retry": sum(f["client_retry_ok"] is False for f in failures),
        "served_by_replica_after": served_by_replica(fleet),
    }
    click.echo(f"  killed {killed.name} back in rotation after {out['killed']['back_in_rotation_s']} s; drained "
               f"{drained.name} exited after {out['drained']['exit_after_s']} s, back after "
               f"{out['drained']['back_in_rotation_s']} s; {len(failures)} failed request(s)", err=True)
    return out


def back_in_rotation(fleet: Fleet, replica: Replica, since: float, timeout_s: float = 900) -> float | None:
    """When HAProxy has the replica UP in both backends again (after it went down)."""
    went_down = False
    while time.monotonic() - since < timeout_s:
        status = fleet.status()
        up = all(status.get((b, replica.name)) == "UP" for b in ("http", "grpc"))
        went_down = went_down or not up
        if went_down and up:
            return time.monotonic()
        gevent.sleep(0.25)
    return None


def _since(times: dict[str, float], end: str, start: str) -> float | None:
    return round(times[end] - times[start], 2) if times.get(end) and start in times else None


def report(result: dict[str, Any]) -> None:
    click.echo(f"{result['replicas']} replicas ({result['serve_args']}) behind {result['balancer']}; "
               f"{result['inputs']['size'][0]}x{result['inputs']['size'][1]} photos; {result['machine']['cpu']}")
    click.echo(f"{'phase':<10}{'users':>6}{'requests':>10}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'failed':>8}"
               f"{'mismatch':>10}")
    phases = [("soak", p) for p in result["soak"]["phases"]] + ([("chaos", result["chaos"]["load"])]
                                                                if "chaos" in result else [])
    for name, p in phases:
        click.echo(f"{name:<10}{p['users']:>6}{p['requests']:>10}{p['throughput_rps']:>8.2f}{p['p50_ms']:>9.0f}"
                   f"{p['p99_ms']:>9.0f}{p['failures']:>8}{p['mismatches']:>10}")
    s = result["soak"]
    for n in s["rss_mb_before"]:
        click.echo(f"RSS {n}: {s['rss_mb_before'][n]:.0f} MB before, {s['rss_mb_after'][n]:.0f} MB after the soak of "
                   f"{s['requests']} requests ({s['rss_growth_pct'].get(n, float('nan')):+.2f} %)")
    if "chaos" in result:
        c = result["chaos"]
        click.echo(f"SIGKILL {c['killed']['replica']}: back in rotation after {c['killed']['back_in_rotation_s']} s; "
                   f"SIGTERM {c['drained']['replica']}: exited after {c['drained']['exit_after_s']} s, back after "
                   f"{c['drained']['back_in_rotation_s']} s")
        click.echo(f"failed requests {len(c['failed_requests'])} (not in flight at the kill: "
                   f"{c['failed_not_in_flight_at_kill']}), after the client's retry {c['failed_after_client_retry']}")
        for f in c["failed_requests"][:5]:
            click.echo(f"  {f['name']} at {f['start_s']:+.2f}..{f['end_s']:+.2f} s from the kill: {f['error'][:150]}")
    click.echo(f"answers checked {result['answers_checked']}, mismatches {result['mismatches']}, "
               f"failed after the client's retry {result['failed_after_client_retry']}")
    click.echo(f"HAProxy: {result['haproxy_log']}")


def _cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s*(.+)", text)
        flags = re.search(r"Flags:\s*(.+)", text)
        have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if flags and f in flags.group(1).split()]
        return f"{model.group(1).strip() if model else '?'}, {os.cpu_count()} cores, flags: {', '.join(have) or 'no AVX2'}"
    except OSError:
        return platform.processor()


def _haproxy_version() -> str:
    out = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else "?"


if __name__ == "__main__":
    main()
