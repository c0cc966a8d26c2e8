"""Kubernetes manifests in deploy/: parse, and hold the promises the README makes about scaling across GPU hosts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def load(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]


def test_kustomization_lists_every_manifest():
    (kustomization,) = load("kustomization.yaml")
    manifests = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


def test_deployment_asks_for_a_gpu_and_probes_grpc_health():
    (deployment,) = load("deployment.yaml")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50051
    assert container["readinessProbe"]["grpc"]["service"] == "facetwin.v1.FaceSwap"
    env = {e["name"]: e["value"] for e in container["env"]}
    grace = float(env["FACETWIN_GRACE_S"])
    assert spec["terminationGracePeriodSeconds"] > grace, "pods must outlive the server's drain"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert {"FACETWIN_ENGINE_CACHE_DIR", "FACETWIN_MODEL_DIR"} <= set(env)
    port = deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
    assert env["FACETWIN_METRICS_PORT"] == port and env["FACETWIN_METRICS_ADDRESS"] == "0.0.0.0"  # scraped by pod IP


def test_services_suit_grpc_load_balancing():
    services = {s["metadata"]["name"]: s for s in load("service.yaml")}
    assert services["facetwin-headless"]["spec"]["clusterIP"] == "None"  # DNS lists every pod: client-side round robin
    for service in services.values():
        (port,) = service["spec"]["ports"]
        assert port["port"] == 50051 and port["appProtocol"] == "kubernetes.io/h2c"


def test_hpa_scales_the_deployment_on_queue_depth():
    (hpa,) = load("hpa.yaml")
    (deployment,) = load("deployment.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    metric_names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert metric_names == ["facetwin_queue_depth"]  # exported by server/metrics.py
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def test_the_tls_component_serves_a_renewed_certificate_and_probes_over_tls():
    import typer

    from facetwin.server.cli import app
    from facetwin.server.config import ServerConfig, env_name

    component = DEPLOY / "tls"
    (kustomization,) = yaml.safe_load_all((component / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Component"
    assert all((component / name).is_file() for name in kustomization["resources"])
    patch_files = [p["path"] for p in kustomization["patches"] if "path" in p]
    assert patch_files == ["deployment-patch.yaml"] and (component / patch_files[0]).is_file()
    (certificate,) = yaml.safe_load_all((component / "certificate.yaml").read_text())
    (patch,) = yaml.safe_load_all((component / "deployment-patch.yaml").read_text())
    (deployment,) = load("deployment.yaml")
    assert patch["metadata"]["name"] == deployment["metadata"]["name"]
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    # Every variable is one the server or its health probe reads.
    settings = {env_name(f.name) for f in dataclasses.fields(ServerConfig)}
    probe = typer.main.get_command(app).commands["healthcheck"]
    probe_vars = {p.envvar for p in probe.params if p.envvar}
    assert set(env) <= settings | probe_vars, set(env) - settings - probe_vars
    # The Secret cert-manager renews is mounted whole (a subPath mount is never updated) where the variables point.
    (mount,) = container["volumeMounts"]
    (volume,) = patch["spec"]["template"]["spec"]["volumes"]
    assert volume["secret"]["secretName"] == certificate["spec"]["secretName"] and mount["name"] == volume["name"]
    assert "subPath" not in mount
    assert all(env[name].startswith(mount["mountPath"] + "/") for name in ("FACETWIN_TLS_CERT", "FACETWIN_TLS_KEY",
                                                                          "FACETWIN_HEALTH_CA"))
    # Clients dial the Services' names, the probe checks one of them; the kubelet's gRPC probes give way to it.
    services = {s["metadata"]["name"] for s in load("service.yaml")}
    assert services <= set(certificate["spec"]["dnsNames"])
    assert env["FACETWIN_HEALTH_SERVER_NAME"] in certificate["spec"]["dnsNames"]
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[name]["grpc"] is None and container[name]["exec"]["command"] == ["facetwin-server",
                                                                                          "healthcheck"]
