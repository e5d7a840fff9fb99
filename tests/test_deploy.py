"""What the fleet is deployed with, checked without running it: the Kubernetes manifests under
deploy/kubernetes/ validated offline against the Kubernetes API schemas (kubernetes-validate, which
ships them), their probes and limits; `osdiff fleet`'s HAProxy configuration accepted by
`haproxy -c` (skipped, with the reason, where HAProxy is not installed).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (the test extra)")

MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))
KUBERNETES = ["1.30.0", kubernetes_validate.latest_version()]  # oldest still maintained when written, newest bundled


def documents() -> list[dict]:
    return [d for path in MANIFESTS for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("version", KUBERNETES)
def test_manifests_validate_against_the_kubernetes_schemas(version):
    docs = documents()
    assert {d["kind"] for d in docs} == {"Deployment", "Service", "PodDisruptionBudget"}
    for d in docs:
        kubernetes_validate.validate(d, version, strict=True)
    # the validation is real: a misspelt field and a wrong type are refused
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)
    broken = copy.deepcopy(deployment)
    broken["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_probes_limits_and_ports():
    docs = documents()
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    # readiness: Triton's standard endpoint (true once both models are loaded); liveness apart
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert set(container["resources"]["limits"]) >= {"memory", "nvidia.com/gpu"}
    assert set(container["resources"]["requests"]) >= {"cpu", "memory"}
    # the drain fits in the grace period: preStop sleep + Triton's --exit-timeout-secs
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert "--exit-timeout-secs=30" in dockerfile and "--strict-readiness=true" in dockerfile
    assert pod["terminationGracePeriodSeconds"] > sleep + 30
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for service in (d for d in docs if d["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= labels.items()
        for p in service["spec"]["ports"]:
            assert p["targetPort"] in ports
        grpc = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
        assert grpc and grpc[0]["appProtocol"] == "kubernetes.io/h2c"


def test_haproxy_configuration(tmp_path):
    from osdiff.serving.fleet import FleetOptions, Replica, haproxy_config

    options = FleetOptions(replicas=3, workdir=tmp_path)
    replicas = [Replica(i, options) for i in range(3)]
    text = haproxy_config(options, replicas)
    # both backends health-check the replicas' HTTP readiness endpoint
    assert text.count("uri /v2/health/ready") == 1 and "option httpchk" in text
    for r in replicas:
        assert f"server {r.name} 127.0.0.1:{r.http_port}\n" in text
        assert f"server {r.name} 127.0.0.1:{r.grpc_port} proto h2 port {r.http_port} check-proto h1" in text
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("HAProxy is not installed (apt-get install haproxy): the configuration was not checked by it")
    cfg = Path(tmp_path) / "haproxy.cfg"
    cfg.write_text(text)
    check = subprocess.run([haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    cfg.write_text(text.replace("balance leastconn", "balance fewest-connections"))
    assert subprocess.run([haproxy, "-c", "-f", str(cfg)], capture_output=True).returncode != 0
