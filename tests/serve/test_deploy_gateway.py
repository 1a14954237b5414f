"""docker-compose.yml's gateway stack (gateway, gateway-grpc, prometheus, grafana) and the files it mounts:
ports agree with the commands, health checks really tell ready from not ready, the Prometheus targets
are compose services on the ports they listen on, the config passes ``promtool check config``, and
Grafana's provisioning points at the mounted dashboard and the compose Prometheus."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from cosyvoice.serve.settings import ENV, PREFIX, GatewaySettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "cosyvoice-gateway.json"


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def _volumes(service: dict) -> dict[str, str]:
    """container path -> host path of the service's bind mounts (read-only ``:ro`` dropped)."""
    mounts = {}
    for spec in service.get("volumes", []):
        source, target, *_ = spec.split(":")
        mounts[target] = source
    return mounts


def _listening_ports(name: str) -> set[int]:
    """The ports a compose service's process listens on, read from its command line."""
    service = SERVICES[name]
    command = service["command"]
    if name == "tritonserver":
        return {int(p) for p in re.findall(r"--(?:http|grpc|metrics)-port=(\d+)", command[-1])}
    if name == "prometheus":
        return {9090}  # the image's default --web.listen-address
    if name == "grafana":
        return {3000}
    ports = {int(_flag(command, "--port"))}
    if "--metrics-port" in command:
        ports.add(int(_flag(command, "--metrics-port")))
    return ports


def test_the_stack_has_its_services_and_triton_is_unchanged():
    assert {"tritonserver", "gateway", "gateway-grpc", "prometheus", "grafana"} <= set(SERVICES)
    assert SERVICES["tritonserver"]["ports"] == ["8000:8000", "8001:8001", "8002:8002"]


@pytest.mark.parametrize("name,port", [("gateway", 8080), ("gateway-grpc", 50000)])
def test_gateway_services_publish_the_port_they_listen_on_and_wait_for_a_healthy_triton(name, port):
    service = SERVICES[name]
    command = service["command"]
    assert _flag(command, "--port") == str(port) and _flag(command, "--host") == "0.0.0.0"
    assert service["ports"] == [f"{port}:{port}"]
    assert service["depends_on"]["tritonserver"] == {"condition": "service_healthy"}
    build = service["build"]
    assert build["dockerfile"] == "deploy/gateway/Dockerfile" and (ROOT / build["context"] / build["dockerfile"]).is_file()
    env = service["environment"]
    # every variable is one the settings read, and together they make valid settings
    assert set(env) <= {PREFIX + suffix for suffix in ENV.values()}, set(env) - {PREFIX + s for s in ENV.values()}
    assert env[f"{PREFIX}API_TOKEN"] is None  # a secret: passed through from the host, never written here
    settings = GatewaySettings.from_env({k: v for k, v in env.items() if v is not None})
    for replica in settings.triton:
        grpc, _, health = replica.partition("|")
        host, _, grpc_port = grpc.rpartition(":")
        assert host == "tritonserver" and health == f"http://tritonserver:{_http_port_of_triton()}"
        assert int(grpc_port) in _listening_ports("tritonserver")
    mount = _volumes(service)[os.path.dirname(env[f"{PREFIX}SPK2INFO"])]
    assert mount in COMPOSE["volumes"]  # registered speakers survive a restart, shared by both frontends


def _http_port_of_triton() -> int:
    return int(re.search(r"--http-port=(\d+)", SERVICES["tritonserver"]["command"][-1]).group(1))


def test_the_dockerfile_copies_existing_paths_runs_unprivileged_and_defaults_to_the_compose_command():
    text = (ROOT / "deploy" / "gateway" / "Dockerfile").read_text()
    assert text.count("FROM ") == 1 and "FROM python:3.11-slim" in text
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"COPY {source} does not exist"
    assert "USER 10001" in text
    (cmd,) = [line for line in text.splitlines() if line.startswith("CMD ")]
    assert json.loads(cmd[4:]) == SERVICES["gateway"]["command"]
    # the image imports, at build time, the modules the two commands run
    assert "import cosyvoice.serve.app, cosyvoice.serve.grpc_server" in text


@pytest.mark.parametrize("name,handler", [("gateway", "cmd_gateway"), ("gateway-grpc", "cmd_gateway_grpc")])
def test_the_compose_commands_are_real_cli_invocations(name, handler):
    from cosyvoice.cli import build_parser

    command = SERVICES[name]["command"]
    assert command[0] == "cosyvoice-pipeline"
    args = build_parser().parse_args(command[1:])
    assert args.func.__name__ == handler and args.host == "0.0.0.0" and args.port == int(_flag(command, "--port"))
    if name == "gateway":
        assert args.workers == 2  # several workers: the CLI switches Prometheus to multiprocess mode


class _Health(http.server.BaseHTTPRequestHandler):
    ready = True

    def do_GET(self):  # noqa: N802 (http.server's name)
        code = 200 if self.path == "/readyz" and type(self).ready else 503 if self.path == "/readyz" else 404
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args):
        pass


def _run_check(test: list[str], old: str, new: str) -> int:
    assert test[0] == "CMD" and test[1] == "python"
    argv = [sys.executable, *[a.replace(old, new) for a in test[2:]]]
    return subprocess.run(argv, capture_output=True, timeout=30).returncode


def test_the_http_healthcheck_passes_on_a_ready_gateway_and_fails_on_an_unready_one():
    test = SERVICES["gateway"]["healthcheck"]["test"]
    assert "/readyz" in test[-1] and "127.0.0.1:8080" in test[-1]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = str(server.server_address[1])
        _Health.ready = True
        assert _run_check(test, "8080", port) == 0
        _Health.ready = False
        assert _run_check(test, "8080", port) != 0
    finally:
        server.shutdown()
        server.server_close()


def test_the_grpc_healthcheck_follows_the_gateways_health_service():
    """Runs compose's check against the gRPC frontend's own health servicer (SERVING only while a
    Triton replica is ready)."""
    import asyncio

    import grpc
    from grpc_health.v1 import health_pb2_grpc

    from cosyvoice.serve.grpc_server import PoolHealth

    test = SERVICES["gateway-grpc"]["healthcheck"]["test"]
    ready = {"now": True}

    async def check_both() -> list[int]:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(PoolHealth(lambda: ready["now"], interval_s=0.0), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            codes = []
            for state in (True, False):
                ready["now"] = state
                done = await asyncio.create_subprocess_exec(
                    sys.executable, *[a.replace("50000", str(port)) for a in test[2:]],
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
                codes.append(await asyncio.wait_for(done.wait(), 30))
            return codes
        finally:
            await server.stop(0)

    assert test[:2] == ["CMD", "python"] and "127.0.0.1:50000" in test[-1]
    serving, not_serving = asyncio.run(check_both())
    assert serving == 0 and not_serving != 0


def test_prometheus_scrapes_compose_services_on_the_ports_they_listen_on():
    prometheus = SERVICES["prometheus"]
    mounts = _volumes(prometheus)
    config_path = _flag_value(prometheus["command"], "--config.file")
    assert (ROOT / mounts[config_path]).resolve() == PROMETHEUS_CONFIG
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
               for job in config["scrape_configs"]}
    assert targets["cosyvoice-gateway"] == ["gateway:8080"] and targets["triton"] == ["tritonserver:8002"]
    for job in config["scrape_configs"]:
        for target in targets[job["job_name"]]:
            host, _, port = target.rpartition(":")
            assert host in SERVICES, f"{job['job_name']}: {host} is not a compose service"
            assert int(port) in _listening_ports(host), f"{target}: {host} does not listen on {port}"


def _flag_value(command: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in command if a.startswith(f"{name}=")]
    return value


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_accepts_the_prometheus_config(tmp_path):
    done = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "prometheus.yml"
    broken.write_text(PROMETHEUS_CONFIG.read_text().replace("scrape_interval: 15s", "scrape_interval: fifteen"))
    done = subprocess.run(["promtool", "check", "config", str(broken)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0  # the check is real


def test_grafana_provisions_the_compose_prometheus_and_the_mounted_dashboard():
    grafana = SERVICES["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert env["GF_SECURITY_ADMIN_PASSWORD"] is None  # a secret: from the host environment only
    mounts = _volumes(grafana)
    for target, source in mounts.items():
        assert (ROOT / source).exists(), f"{source} (mounted at {target}) is not in the repository"
    provisioning = ROOT / mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert 9090 in _listening_ports("prometheus")
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "cosyvoice.yml").read_text())["providers"]
    dashboards_dir = provider["options"]["path"]
    assert (ROOT / mounts[dashboards_dir]).resolve() == DASHBOARD.parent
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert os.path.dirname(home) == dashboards_dir and (DASHBOARD.parent / os.path.basename(home)).is_file()
    # the dashboard's datasource variable starts on the provisioned datasource
    dashboard = json.loads(DASHBOARD.read_text())
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus" and variable["current"]["value"] == source["uid"]
