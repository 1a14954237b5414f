"""k8s/triton manifests (validated with kubernetes-validate) and the root docker-compose.yml."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from cosyvoice.triton import publish

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K8S = os.path.join(ROOT, "k8s", "triton")
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


def _docs() -> dict[str, dict]:
    docs = {}
    for name in sorted(os.listdir(K8S)):
        with open(os.path.join(K8S, name)) as f:
            for doc in yaml.safe_load_all(f):
                docs[doc["kind"]] = doc
    return docs


def _flag(args, name):
    return next(a.split("=", 1)[1] for a in args if a.startswith(f"--{name}="))


def test_k8s_manifests_validate_and_agree_with_each_other():
    import kubernetes_validate

    docs = _docs()
    assert set(docs) == {"Deployment", "Service", "HorizontalPodAutoscaler", "ServiceMonitor"}
    for kind, doc in docs.items():
        if kind == "ServiceMonitor":
            continue  # a CRD (Prometheus Operator): checked structurally below
        for version in ("1.25.0", "1.33.0", "1.37.0"):
            kubernetes_validate.validate(doc, version, strict=True)
    deployment, service, hpa, monitor = (docs[k] for k in ("Deployment", "Service", "HorizontalPodAutoscaler",
                                                          "ServiceMonitor"))
    pod = deployment["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {p["name"]: p["containerPort"] for p in server["ports"]} == PORTS
    assert [_flag(server["args"], f"{n}-port") for n in PORTS] == [str(p) for p in PORTS.values()]
    assert server["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert server["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # the repository is served from where it was rendered for (triton-publish --mount)
    assert _flag(server["args"], "model-repository") == f"{publish.DEFAULT_MOUNT}/model_repo"
    (pull,) = pod["initContainers"]
    assert f"--dest {publish.DEFAULT_MOUNT}" in pull["command"][-1]
    mounts = {c["name"]: {m["name"]: m["mountPath"] for m in c["volumeMounts"]} for c in (pull, server)}
    assert mounts["pull-model-repo"]["models"] == mounts["tritonserver"]["models"] == "/models"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == PORTS
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["metrics"][0]["type"] == "Pods"  # a custom (queue) metric, not CPU
    broken = _docs()["Deployment"]
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paths"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.33.0", strict=True)


def _published(tmp_path, engine, hf_dir, model_dir):
    root = str(tmp_path / "triton" / "cosyvoice2")
    for _ in range(2):
        publish.publish_triton_repo(root, engine_dir=str(engine), hf_dir=hf_dir, model_dir=model_dir, load_test="skip")
    return root


def _run_pull(command: str, root: str, dest: str, version: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MODEL_REPO_ROOT=root, MODEL_VERSION=version,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    return subprocess.run(["/bin/sh", "-c", command.replace(publish.DEFAULT_MOUNT, dest)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_pull_commands_of_k8s_and_compose_fetch_the_published_version(tmp_path, hf_dir, model_dir):
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "config.json").write_text("{}")
    (engine / "rank0.engine").write_bytes(b"\1" * 64)
    root = _published(tmp_path, engine, hf_dir, model_dir)
    k8s_command = _docs()["Deployment"]["spec"]["template"]["spec"]["initContainers"][0]["command"][-1]
    with open(os.path.join(ROOT, "docker-compose.yml")) as f:
        compose = yaml.safe_load(f)
    compose_command = compose["services"]["tritonserver"]["command"][-1].replace("$$", "$").split(" && ")[0]
    assert compose_command.strip() == k8s_command.replace("exec ", "", 1).strip()
    dest = str(tmp_path / "models" / "cosyvoice2")
    done = _run_pull(k8s_command, root, dest, "")
    assert done.returncode == 0, done.stderr
    assert "pulled version 2" in done.stdout
    assert os.path.isfile(os.path.join(dest, "model_repo", "cosyvoice2", "config.pbtxt"))
    done = _run_pull(k8s_command, root, dest, "1")
    assert done.returncode == 0 and "pulled version 1" in done.stdout, done.stderr
    done = _run_pull(k8s_command, root, dest, "7")
    assert done.returncode != 0 and "version 7 has no manifest.json" in done.stderr
    # a CPU fallback version (python backend, no engine) is published on its own channel: the GPU
    # deployment's pull keeps serving the GPU version and refuses the CPU one even when pinned
    cpu = publish.publish_triton_repo(root, engine_dir=str(engine), hf_dir=hf_dir, model_dir=model_dir,
                                      load_test="skip", llm_backend="python")
    assert (cpu.version, cpu.channel) == (3, "cpu")
    done = _run_pull(k8s_command, root, dest, "")
    assert done.returncode == 0 and "pulled version 2" in done.stdout, done.stderr
    done = _run_pull(k8s_command, root, dest, "3")
    assert done.returncode != 0 and "version 3 belongs to channel 'cpu'" in done.stderr
    assert os.path.isfile(os.path.join(dest, "trt_engines", "rank0.engine"))  # the refused pull left dest as it was


def test_compose_default_file_maps_the_ports_triton_listens_on():
    with open(os.path.join(ROOT, "docker-compose.yml")) as f:
        compose = yaml.safe_load(f)
    service = compose["services"]["tritonserver"]
    assert service["ports"] == [f"{p}:{p}" for p in PORTS.values()]  # upstream D9: mapped != listened
    command = service["command"][-1]
    for name, port in PORTS.items():
        assert f"--{name}-port={port}" in command
    assert f"--model-repository={publish.DEFAULT_MOUNT}/model_repo" in command
    assert service["healthcheck"]["test"][-1].endswith(":8000/v2/health/ready")
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert service["shm_size"] == "1gb"
    dockerfile = os.path.join(ROOT, service["build"]["context"], service["build"]["dockerfile"])
    with open(dockerfile) as f:
        assert f.readline().startswith("#") and "FROM nvcr.io/nvidia/tritonserver:25.06-trtllm-python-py3" in f.read()
