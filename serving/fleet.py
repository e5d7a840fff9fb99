"""`osdiff fleet`: N `osdiff serve` replicas on one machine behind HAProxy, from one command.

    clients --HTTP :8000--> HAProxy --HTTP--> replica i: osdiff serve, HTTP base+3i
            --gRPC :8001-->  (L7)   --h2c --> gRPC base+3i+1 (metrics: base+3i+2)

HAProxy (the distribution's package) balances every request, HTTP and gRPC alike (in HTTP mode it
sees each gRPC call as one HTTP/2 request, so one long-lived client connection is spread over all
replicas), to the replica with the fewest requests in flight, among those whose readiness
endpoint (`GET /v2/health/ready` on the replica's HTTP port, every second) answers 200 (and
that have not refused a connection since: passive health checks). A request
whose replica refused the connection or died before answering is sent again to another (L7
retries: the requests of this codec have no side effects); this needs the whole request in one
HAProxy buffer (tune.bufsize, here 1 MiB: images up to about 580x580 over binary HTTP or gRPC).
HAProxy's statistics (`/stats`, `/stats;csv`) and its Prometheus metrics (`/metrics`) are on the
stats port; every replica has Triton's Prometheus metrics on its own metrics port, all listed in
the `prometheus.yml` written to the fleet's folder.

Each replica runs in a process group of its own (as in a container) and is started again when it
exits (as Kubernetes restarts a container; with a growing delay when it exits soon after it
started). SIGTERM to a replica drains it: Triton takes no new connection (so the health check
fails and HAProxy stops sending to it), finishes the requests of the connections it has, exits.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

HAPROXY_BUFSIZE = 1 << 20  # an L7 retry re-sends a request only if it fits in one buffer
RESTART_DELAY_MAX_S = 30.0


class FleetError(RuntimeError):
    """The fleet cannot start here (no HAProxy, a replica that does not come up, ...)."""


@dataclass
class FleetOptions:
    replicas: int = 2
    serve_args: list[str] = field(default_factory=list)  # for every `osdiff serve` (model, backend, ...)
    workdir: Path = Path("osdiff-fleet")  # haproxy.cfg, prometheus.yml, logs
    address: str = "0.0.0.0"  # the balancer's
    http_port: int = 8000
    grpc_port: int = 8001
    stats_port: int = 8404
    base_port: int = 9000  # replica i: HTTP base + 3i, gRPC + 1, metrics + 2 (on 127.0.0.1)
    ready_timeout_s: float = 600.0
    balancer_retries: int = 3  # HAProxy's tries of a request on other replicas (0: none)


class Replica:
    """One `osdiff serve` in a process group of its own; log in workdir/replica-<i>.log (appended
    to over restarts)."""

    def __init__(self, index: int, options: FleetOptions) -> None:
        self.index = index
        self.name = f"r{index}"
        self.http_port = options.base_port + 3 * index
        self.grpc_port = self.http_port + 1
        self.metrics_port = self.http_port + 2
        self.log_path = options.workdir / f"replica-{index}.log"
        self.command = [sys.executable, "-m", "osdiff.cli", "serve", *options.serve_args,
                        "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                        "--metrics-port", str(self.metrics_port)]
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.starts = 0

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts + 1}: {' '.join(self.command)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=_end_with_parent)
        self.started_at = time.monotonic()
        self.starts += 1

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ready(self) -> bool:
        """Triton's standard readiness: both models loaded (serving/server.py)."""
        try:
            with urllib.request.urlopen(f"http://{self.http}/v2/health/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL to the whole process group: what a container's sudden end does to its processes."""
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM to `osdiff serve` only (a container's PID 1): it drains, then exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def metrics(self) -> str:
        """Triton's Prometheus metrics of this replica (text format)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return str(r.read().decode())


class Fleet:
    """The replicas, HAProxy in front of them, and a supervisor thread that starts again any
    replica that exits. `start()` returns once every replica is ready and HAProxy has them in
    rotation; `stop()` drains the replicas (SIGTERM) and stops HAProxy.
    Raises FleetError when HAProxy is missing or a replica does not become ready."""

    def __init__(self, options: FleetOptions) -> None:
        if options.replicas < 1:
            raise FleetError("a fleet needs at least one replica")
        self.options = options
        self.haproxy_bin = shutil.which("haproxy")
        if self.haproxy_bin is None:
            raise FleetError("the fleet's load balancer is HAProxy, not found on PATH: apt-get install haproxy")
        options.workdir.mkdir(parents=True, exist_ok=True)
        self.replicas = [Replica(i, options) for i in range(options.replicas)]
        self.haproxy: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.events: list[tuple[float, str, str]] = []  # (monotonic time, replica, what)
        self.supervisor = threading.Thread(target=self._supervise, name="fleet-supervisor", daemon=True)

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.options.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.options.grpc_port}"

    @property
    def stats_url(self) -> str:
        return f"http://127.0.0.1:{self.options.stats_port}"

    def start(self) -> None:
        cfg = self.options.workdir / "haproxy.cfg"
        cfg.write_text(haproxy_config(self.options, self.replicas))
        (self.options.workdir / "prometheus.yml").write_text(prometheus_config(self.options, self.replicas))
        check = subprocess.run([str(self.haproxy_bin), "-c", "-f", str(cfg)], capture_output=True, text=True)
        if check.returncode != 0:
            raise FleetError(f"HAProxy refuses {cfg}: {check.stdout}{check.stderr}")
        for r in self.replicas:
            r.start()
            self._event(r, "started")
        with open(self.options.workdir / "haproxy.log", "ab") as log:
            self.haproxy = subprocess.Popen([str(self.haproxy_bin), "-db", "-f", str(cfg)], stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_end_with_parent)
        try:
            self.wait_in_rotation(self.replicas, self.options.ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.supervisor.start()

    def wait_in_rotation(self, replicas: list[Replica], timeout_s: float) -> None:
        """Wait until HAProxy has these replicas UP in both backends. Raises FleetError when one
        exits before it is ready (and the supervisor is not running) or after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.supervisor.is_alive():
                for r in replicas:
                    if not r.running():
                        raise FleetError(f"replica {r.name} exited before it was ready:\n{_tail(r.log_path)}")
            if self.haproxy is not None and self.haproxy.poll() is not None:
                raise FleetError(f"HAProxy exited:\n{_tail(self.options.workdir / 'haproxy.log')}")
            status = self.status()
            if all(status.get((b, r.name)) == "UP" for r in replicas for b in ("http", "grpc")):
                return
            time.sleep(0.25)
        raise FleetError(f"replicas {', '.join(r.name for r in replicas)} not in rotation within {timeout_s:.0f} s; "
                         f"logs in {self.options.workdir}")

    def status(self) -> dict[tuple[str, str], str]:
        """HAProxy's view: (backend "http" or "grpc", replica name) -> UP, DOWN, ... ({} while
        HAProxy does not answer)."""
        try:
            with urllib.request.urlopen(f"{self.stats_url}/stats;csv", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return {}
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {(row["pxname"], row["svname"]): row["status"].split(" ")[0]
                for row in rows if row["pxname"] in ("http", "grpc") and row["svname"].startswith("r")}

    def stop(self) -> None:
        """SIGTERM every replica (they drain), SIGKILL what has not exited 60 s later, stop HAProxy."""
        self.stopping.set()
        if self.supervisor.is_alive():
            self.supervisor.join()
        for r in self.replicas:
            r.terminate()
        for r in self.replicas:
            if r.process is None:
                continue
            try:
                r.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                r.kill()
                r.process.wait()
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.terminate()
            self.haproxy.wait(timeout=30)

    def _event(self, replica: Replica, what: str) -> None:
        with self.lock:
            self.events.append((time.monotonic(), replica.name, what))

    def _supervise(self) -> None:
        fast_exits = [0] * len(self.replicas)
        due = [0.0] * len(self.replicas)  # when a replica that exited is started again
        while not self.stopping.wait(0.2):
            for i, r in enumerate(self.replicas):
                if r.running():
                    continue
                now = time.monotonic()
                if due[i] == 0.0:
                    code = r.process.returncode if r.process else None
                    self._event(r, f"exited ({code})")
                    fast_exits[i] = fast_exits[i] + 1 if now - r.started_at < 30 else 0
                    due[i] = now + min(RESTART_DELAY_MAX_S, (2 ** fast_exits[i] - 1) if fast_exits[i] > 1 else 0.0)
                if now >= due[i]:
                    r.start()
                    self._event(r, "started")
                    due[i] = 0.0


def serve_until_signal(options: FleetOptions, echo: Callable[[str], None]) -> None:
    """`osdiff fleet`: start the fleet, serve until SIGTERM or SIGINT, then drain and stop.
    A signal while it starts stops what was started. Raises FleetError (see Fleet)."""
    started, stop = threading.Event(), threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not started.is_set():
            raise KeyboardInterrupt  # Fleet.start stops what it started
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fleet = Fleet(options)
    fleet.start()
    started.set()
    echo(f"fleet of {options.replicas}: HTTP :{options.http_port}, gRPC :{options.grpc_port}; HAProxy statistics "
         f":{options.stats_port}/stats, its metrics :{options.stats_port}/metrics; replica metrics on "
         + ", ".join(f":{r.metrics_port}/metrics" for r in fleet.replicas)
         + f" ({options.workdir}/prometheus.yml); SIGTERM or Ctrl-C drains and stops")
    while not stop.wait(1.0):
        pass
    echo("draining the replicas ...")
    fleet.stop()


def haproxy_config(options: FleetOptions, replicas: list[Replica]) -> str:
    """HAProxy's configuration for the fleet: see the module's docstring."""
    http_servers = "\n".join(f"    server {r.name} {r.http}" for r in replicas)
    # gRPC is HTTP/2 without TLS (h2c) to the replicas; its health check asks the replica's HTTP port
    grpc_servers = "\n".join(f"    server {r.name} {r.grpc} proto h2 port {r.http_port} check-proto h1" for r in replicas)
    retry = f"""    # A request whose replica refused the connection, closed it without an answer or said
    # 503 goes to another replica (once per try); codec requests have no side effects.
    retries {options.balancer_retries}
    option redispatch 1
    retry-on conn-failure empty-response junk-response 503
""" if options.balancer_retries else "    retries 0\n    retry-on none\n"
    return f"""# Written by `osdiff fleet` (serving/fleet.py).
global
    maxconn 4096
    tune.bufsize {HAPROXY_BUFSIZE}
    log stdout format raw local0

defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client 10m
    timeout server 10m
    timeout http-request 1m
{retry}    # Health: Triton's readiness, true only once both models are loaded (serving/server.py),
    # checked every second; and a replica that refuses a connection of the traffic itself (it
    # died, or drains) is out at once, until its next good check.
    option httpchk
    http-check send meth GET uri /v2/health/ready
    http-check expect status 200
    default-server check inter 1s fall 2 rise 1 observe layer4 error-limit 1 on-error mark-down

frontend http
    bind {options.address}:{options.http_port}
    default_backend http

frontend grpc
    bind {options.address}:{options.grpc_port} proto h2
    default_backend grpc

frontend stats
    bind {options.address}:{options.stats_port}
    http-request use-service prometheus-exporter if {{ path /metrics }}
    stats enable
    stats uri /stats
    stats refresh 5s

backend http
    balance leastconn
{http_servers}

backend grpc
    balance leastconn
{grpc_servers}
"""


def prometheus_config(options: FleetOptions, replicas: list[Replica]) -> str:
    """A Prometheus scrape configuration for every replica's metrics and HAProxy's."""
    targets = ", ".join(f"'127.0.0.1:{r.metrics_port}'" for r in replicas)
    return f"""# Written by `osdiff fleet` (serving/fleet.py): prometheus --config.file=prometheus.yml
scrape_configs:
  - job_name: osdiff-replicas
    scrape_interval: 5s
    static_configs:
      - targets: [{targets}]
  - job_name: osdiff-balancer
    scrape_interval: 5s
    static_configs:
      - targets: ['127.0.0.1:{options.stats_port}']
"""


def _end_with_parent() -> None:
    """In a child, before exec: SIGTERM when the thread that started it ends (Linux
    PR_SET_PDEATHSIG), so that no replica outlives a fleet that was killed."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return f"(no log at {path})"
