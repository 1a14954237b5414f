"""k8s/gateway: the gateway's Deployment, Service, HPA and PodDisruptionBudget validate against Kubernetes'
schemas (kubernetes-validate, strict) and agree with each other; the ServiceMonitor (a Prometheus
Operator CRD, no schema bundled) is checked field by field; the containers run what docker-compose.yml
runs and read the API token only from an optional Secret."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from cosyvoice.serve.settings import ENV, PREFIX, GatewaySettings

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = ROOT / "k8s" / "gateway"
VERSIONS = ("1.33.0", "1.37.0")
KINDS = {"Deployment", "Service", "HorizontalPodAutoscaler", "ServiceMonitor", "PodDisruptionBudget"}
#: the fields of ServiceMonitor (monitoring.coreos.com/v1) these manifests may use
MONITOR_SPEC = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels",
                "sampleLimit"}
MONITOR_ENDPOINT = {"port", "targetPort", "path", "interval", "scrapeTimeout", "scheme", "honorLabels",
                    "relabelings", "metricRelabelings", "params"}
DURATION = re.compile(r"^(\d+(ms|s|m|h))+$")


def _docs() -> dict[str, dict]:
    docs = {}
    for path in sorted(GATEWAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in docs, f"two {doc['kind']} manifests"
            docs[doc["kind"]] = doc
    return docs


def _validate(doc: dict) -> None:
    for version in VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def _containers() -> dict[str, dict]:
    return {c["name"]: c for c in _docs()["Deployment"]["spec"]["template"]["spec"]["containers"]}


def test_built_in_kinds_validate_and_a_broken_probe_does_not():
    docs = _docs()
    assert set(docs) == KINDS
    for kind, doc in docs.items():
        if kind != "ServiceMonitor":
            _validate(doc)
    broken = copy.deepcopy(docs["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paths"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)


def test_deployment_probes_ports_and_resources():
    deployment = _docs()["Deployment"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    http, grpc = _containers()["gateway"], _containers()["gateway-grpc"]
    assert {p["name"]: p["containerPort"] for p in http["ports"]} == {"http": 8080}
    assert {p["name"]: p["containerPort"] for p in grpc["ports"]} == {"grpc": 50000, "grpc-metrics": 9091}
    assert grpc["command"][grpc["command"].index("--metrics-port") + 1] == "9091"
    assert http["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert http["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert grpc["readinessProbe"]["grpc"] == {"port": 50000}  # the gRPC health protocol
    # liveness must not follow Triton: a Triton outage would otherwise restart every gateway
    assert "grpc" not in grpc["livenessProbe"] and grpc["livenessProbe"]["tcpSocket"]["port"] == "grpc"
    for container in (http, grpc):
        resources = container["resources"]
        assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]
        assert "nvidia.com/gpu" not in resources["limits"]  # the GPUs are Triton's
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001


def test_containers_run_what_compose_runs_with_valid_settings_and_the_token_from_an_optional_secret():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    containers = _containers()
    assert containers["gateway"]["command"] == compose["gateway"]["command"]
    assert containers["gateway-grpc"]["command"] == compose["gateway-grpc"]["command"]
    known = {PREFIX + suffix for suffix in ENV.values()}
    for container in containers.values():
        env = {e["name"]: e for e in container["env"]}
        assert set(env) <= known, set(env) - known
        token = env[f"{PREFIX}API_TOKEN"]
        assert "value" not in token
        ref = token["valueFrom"]["secretKeyRef"]
        assert ref["name"] and ref["key"] and ref["optional"] is True  # no Secret: an open API, pods still start
        plain = {name: e["value"] for name, e in env.items() if "value" in e}
        settings = GatewaySettings.from_env(plain)
        assert settings.spk2info.startswith("s3://")  # one registry file for every pod
        assert all(r.split("|")[0].rpartition(":")[2] == "8001" for r in settings.triton)
    triton_service = yaml.safe_load((ROOT / "k8s" / "triton" / "service.yaml").read_text())
    name = triton_service["metadata"]["name"]
    assert settings.triton[0] == f"{name}:8001|http://{name}:8000"


def test_service_pdb_and_hpa_select_the_deployments_pods():
    docs = _docs()
    deployment, service, pdb, hpa = (docs[k] for k in ("Deployment", "Service", "PodDisruptionBudget",
                                                       "HorizontalPodAutoscaler"))
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]  # a drain can still evict one
    container_ports = {p["name"]: p["containerPort"] for c in _containers().values() for p in c["ports"]}
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {"http", "grpc", "metrics", "grpc-metrics"}
    assert (ports["http"]["port"], ports["grpc"]["port"]) == (8080, 50000)
    for port in ports.values():
        assert port["targetPort"] in container_ports
    assert ports["metrics"]["targetPort"] == "http"  # /metrics is served by the FastAPI app
    assert ports["grpc-metrics"]["targetPort"] == "grpc-metrics"  # the gRPC frontend's own /metrics
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment",
                                                                     deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= deployment["spec"]["replicas"] >= 2
    (cpu,) = hpa["spec"]["metrics"]
    assert cpu["type"] == "Resource" and cpu["resource"]["name"] == "cpu"
    assert cpu["resource"]["target"]["type"] == "Utilization"


def test_the_commented_in_flight_metric_is_a_valid_pods_metric_once_an_adapter_serves_it():
    """The HPA's optional Pods metric is kept as a comment (it needs a custom-metrics adapter): uncommented,
    it must still make a valid HPA on a metric the gateway exports."""
    from cosyvoice.serve import metrics

    text = (GATEWAY / "hpa.yaml").read_text()
    assert "adapter" in text
    block = "\n".join(line[1:] for line in text.splitlines() if re.match(r"^#\s{4}", line))
    (pods_metric,) = yaml.safe_load(block)
    hpa = copy.deepcopy(_docs()["HorizontalPodAutoscaler"])
    hpa["spec"]["metrics"].append(pods_metric)
    _validate(hpa)
    exported = {m.name for m in metrics.REGISTRY.collect()}
    assert pods_metric["type"] == "Pods" and pods_metric["pods"]["metric"]["name"] in exported


def test_service_monitor_scrapes_the_metrics_port_of_the_service():
    docs = _docs()
    monitor, service = docs["ServiceMonitor"], docs["Service"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"] and set(monitor["spec"]) <= MONITOR_SPEC
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"]
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= MONITOR_ENDPOINT, set(endpoint) - MONITOR_ENDPOINT
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
        assert DURATION.match(endpoint["interval"])
    with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):  # a CRD: nothing bundled to check against
        kubernetes_validate.validate(monitor, VERSIONS[-1], strict=True)
