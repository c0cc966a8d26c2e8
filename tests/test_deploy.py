"""Kubernetes manifests in deploy/: parse, and hold the promises the README makes about scaling across GPU hosts."""

from __future__ import annotations

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
