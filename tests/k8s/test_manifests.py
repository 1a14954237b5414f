"""Kubernetes: every manifest under k8s/, every step Job our op tags produce and every Pipes pod spec
validate against current Kubernetes schemas (kubernetes-validate, strict: unknown fields fail);
GPU steps request nvidia.com/gpu and land on GPU nodes; RBAC is least privilege; Helm values are
consistent with the RBAC, the instance ConfigMap and our code location."""

import json
import re
from pathlib import Path

import kubernetes
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
#: the oldest Kubernetes minor still in upstream support and the newest schema bundled
VERSIONS = ("1.33.0", "1.37.0")
#: steps that compute on the GPU themselves with pipelines.k8s.gpu_op_tags (request, node selector, toleration)
GPU_STEP_ASSETS = {"speech_tokens"}


def validate(manifest: dict) -> None:
    for version in VERSIONS:
        kubernetes_validate.validate(manifest, version, strict=True)


def manifests() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(K8S.rglob("*.y*ml")):
        if path.parent.name == "helm":
            continue  # chart values, not manifests (tested below)
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                found.append((f"{path.relative_to(REPO)}#{i}:{doc['kind']}", doc))
    return found


@pytest.mark.parametrize("name,manifest", manifests(), ids=[n for n, _ in manifests()])
def test_every_manifest_under_k8s_validates(name, manifest):
    group = manifest["apiVersion"].rpartition("/")[0]
    if "." in group and not group.endswith(".k8s.io"):
        # a custom resource (e.g. prometheus-operator's ServiceMonitor): no schema ships with
        # kubernetes-validate, so only what every object needs is checked
        assert manifest["metadata"]["name"] and isinstance(manifest.get("spec"), dict), name
        with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
            kubernetes_validate.validate(manifest, VERSIONS[-1], strict=True)
        return
    validate(manifest)


def test_an_invalid_resource_quantity_is_rejected_so_validation_is_real():
    job = yaml.safe_load((K8S / "pool-limits-job.yaml").read_text())
    job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = {"x": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(job)
    job = yaml.safe_load((K8S / "pool-limits-job.yaml").read_text())
    job["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(job)


@pytest.fixture(scope="module")
def distributed_defs(monkeypatch_module):
    monkeypatch_module.setenv("COSYVOICE_DEPLOYMENT", "distributed")
    for name in ("COSYVOICE_CORPUS_ROOT", "COSYVOICE_DATA_ROOT", "COSYVOICE_MODEL_ROOT"):
        monkeypatch_module.setenv(name, "s3://bucket/prefix")
    from pipelines.definitions import defs

    return defs


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def step_job(op_tags: dict, name: str) -> dict:
    """The step Job k8s_job_executor builds: executor step defaults merged DEEP with the op's tags."""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job

    from pipelines.executors import STEP_K8S_CONFIG

    tags = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in op_tags.items()}
    from dagster_k8s.job import get_user_defined_k8s_config

    merged = K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(STEP_K8S_CONFIG)).merge(
        K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(tags))).run_k8s_config
    job = construct_dagster_k8s_job(
        DagsterK8sJobConfig(job_image="registry.example.com/cosyvoice/pipeline:0.1.0",
                            dagster_home="/opt/dagster/dagster_home", image_pull_policy="IfNotPresent",
                            instance_config_map="cosyvoice-dagster-instance", service_account_name="cosyvoice-dagster"),
        args=["dagster", "api", "execute_step", "{}"], job_name=f"dagster-step-{name.replace('_', '-')}",
        user_defined_k8s_config=merged, component="step_worker")
    return kubernetes.client.ApiClient().sanitize_for_serialization(job)


def test_every_assets_step_job_validates_and_gpu_steps_request_gpus(distributed_defs):
    from pipelines.executors import executor_for

    assert executor_for("distributed").name == "cosyvoice_k8s_job_executor"
    graph = distributed_defs.resolve_asset_graph()
    seen = set()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if not node.is_materializable:
            continue
        assets_def = node.assets_def
        name = key.to_user_string()
        job = step_job(dict(assets_def.op.tags), name)
        validate(job)
        pod = job["spec"]["template"]["spec"]
        container = pod["containers"][0]
        limits = container.get("resources", {}).get("limits", {})
        if name in GPU_STEP_ASSETS:
            assert int(limits["nvidia.com/gpu"]) >= 1, name
            assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), name
            seen.add(name)
        elif "gpu" not in (node.pools or ()):  # gpu-pool steps that only launch a GPU pod may ask for one
            assert "nvidia.com/gpu" not in limits, f"{name} is a CPU step but requests a GPU"
        assert job["spec"]["ttlSecondsAfterFinished"] == 86400 and job["spec"]["backoffLimit"] == 0
    assert "speech_tokens" in seen


def test_gpu_node_selector_tolerations_and_image_come_from_the_environment(monkeypatch):
    from pipelines.k8s import gpu_op_tags

    monkeypatch.setenv("COSYVOICE_GPU_NODE_SELECTOR", '{"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}')
    monkeypatch.setenv("COSYVOICE_GPU_TOLERATIONS", '[{"key": "gpu", "operator": "Equal", "value": "h100", '
                                                     '"effect": "NoSchedule"}]')
    monkeypatch.setenv("COSYVOICE_GPU_IMAGE", "registry.example.com/cosyvoice/pipeline-gpu:0.1.0")
    job = step_job(gpu_op_tags(gpus=2), "speech_tokens")
    validate(job)
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["tolerations"][0]["value"] == "h100"
    assert pod["containers"][0]["image"].endswith("pipeline-gpu:0.1.0")
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"


def pipes_pod_specs() -> list[tuple[str, dict]]:
    """``base_pod_spec``s our assets hand to PipesK8sClient (those that exist in this checkout)."""
    from pipelines.k8s import training_pod_spec
    from pipelines.launchers import K8sEngineBuilder

    return [("training", training_pod_spec(2, volume_claim="cosyvoice-models", credentials_secret="cosyvoice-s3")),
            ("trtllm_engine", K8sEngineBuilder().pod_spec("s3://bucket/export/trtllm/bf16", max_batch_size=16,
                                                           max_num_tokens=32768, gemm_plugin="bfloat16"))]


@pytest.mark.parametrize("name,spec", pipes_pod_specs(), ids=[n for n, _ in pipes_pod_specs()])
def test_pipes_pods_validate_and_request_gpus(name, spec):
    from dagster_k8s.pipes import build_pod_body

    own_images = all(c.get("image") for c in spec["containers"])
    pod = build_pod_body(pod_name=f"dagster-pipes-{name.replace('_', '-')}",
                         image=None if own_images else "registry.example.com/x:1",
                         command=None if own_images else ["python", "-m", "x"], env_vars={"DAGSTER_PIPES_CONTEXT": "e30="},
                         base_pod_meta={"labels": {"app.kubernetes.io/part-of": "cosyvoice-pipeline"}},
                         base_pod_spec=spec)
    manifest = {"apiVersion": "v1", "kind": "Pod", **kubernetes.client.ApiClient().sanitize_for_serialization(pod)}
    validate(manifest)
    containers = manifest["spec"]["containers"] + manifest["spec"].get("initContainers", [])
    assert any(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1 for c in containers)


def test_rbac_is_least_privilege_and_matches_the_helm_values():
    docs = [d for d in yaml.safe_load_all((K8S / "rbac.yaml").read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    (role,) = [d for d in docs if d["kind"] == "Role"]
    allowed = {"jobs", "jobs/status", "pods", "pods/log", "pods/status", "events", "services"}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert set(rule["resources"]) <= allowed, rule
        assert not {"update", "patch", "deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"])
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    (account,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": account["metadata"]["namespace"]}]
    values = yaml.safe_load((K8S / "helm" / "values.yaml").read_text())
    assert values["rbacEnabled"] is False and values["serviceAccount"]["create"] is False
    assert values["serviceAccount"]["name"] == values["global"]["serviceAccountName"] == account["metadata"]["name"]


def test_the_rbac_comment_states_the_real_boundary_creating_pods_reaches_every_secret_of_the_namespace():
    """The Role has no verbs on Secrets, but ``pods: create`` lets the account run a pod that mounts
    any Secret of its namespace: the comment must not promise more than the namespace gives."""
    text = (K8S / "rbac.yaml").read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    (role,) = [d for d in yaml.safe_load_all(text) if d and d["kind"] == "Role"]
    assert any("pods" in r["resources"] and "create" in r["verbs"] for r in role["rules"])
    assert not re.search(r"no access to secrets", header, re.IGNORECASE), "pods:create reaches every Secret"
    assert re.search(r"boundary: the namespace", header, re.IGNORECASE)
    assert "dedicated namespace" in header and "any Secret of the namespace" in header
    (namespace,) = [d for d in yaml.safe_load_all(text) if d and d["kind"] == "Namespace"]
    assert role["metadata"]["namespace"] == namespace["metadata"]["name"]


def test_helm_values_deploy_our_code_location_with_postgres_and_the_k8s_run_launcher():
    values = yaml.safe_load((K8S / "helm" / "values.yaml").read_text())
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["postgresql"]["postgresqlDatabase"] and values["global"]["postgresqlSecretName"]
    daemon = values["dagsterDaemon"]
    assert daemon["runCoordinator"]["type"] == "QueuedRunCoordinator"
    assert daemon["runMonitoring"]["enabled"] and daemon["runMonitoring"]["freeSlotsAfterRunEndSeconds"] > 0
    assert daemon["runRetries"]["retryOnAssetOrOpFailure"] is False
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "pipelines.definitions"]
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert env["COSYVOICE_DEPLOYMENT"] == "distributed"
    assert all(env[k].startswith("s3://") for k in ("COSYVOICE_CORPUS_ROOT", "COSYVOICE_DATA_ROOT", "COSYVOICE_MODEL_ROOT"))
    # the code server as the chart renders it, and the run launcher's run pod config, are valid k8s objects
    image = deployment["image"]
    validate({"apiVersion": "apps/v1", "kind": "Deployment",
              "metadata": {"name": "cosyvoice-dagster-user-deployments-cosyvoice", "namespace": "cosyvoice"},
              "spec": {"replicas": 1, "selector": {"matchLabels": {"component": "user-deployments"}},
                       "template": {"metadata": {"labels": {"component": "user-deployments"}}, "spec": {
                           "serviceAccountName": values["global"]["serviceAccountName"],
                           "containers": [{
                               "name": "cosyvoice", "image": f"{image['repository']}:{image['tag']}",
                               "imagePullPolicy": image["pullPolicy"],
                               "args": ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", str(deployment["port"]),
                                        *deployment["dagsterApiGrpcArgs"]],
                               "env": deployment["env"], "envFrom": [{"secretRef": s} for s in deployment["envSecrets"]],
                               "resources": deployment["resources"],
                               "securityContext": deployment["securityContext"]}]}}}})
    run_config = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]
    snake = {re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower(): v for k, v in run_config.items()}
    job = step_job({"dagster-k8s/config": snake}, "run")
    validate(job)


def test_pgbouncer_serves_the_charts_database_user_and_secret_in_session_mode():
    """k8s/pgbouncer.yaml is what the values' "at scale" PostgreSQL host names; planned events name subsets."""
    import configparser

    values = yaml.safe_load((K8S / "helm" / "values.yaml").read_text())
    config_map, deployment, service = yaml.safe_load_all((K8S / "pgbouncer.yaml").read_text())
    ini = configparser.ConfigParser(inline_comment_prefixes=(";",), comment_prefixes=(";", "#"))
    ini.read_string(config_map["data"]["pgbouncer.ini"])
    assert ini["pgbouncer"]["pool_mode"] == "session"  # LISTEN/NOTIFY (the event-log watcher) needs it
    assert ini["pgbouncer"]["auth_file"].startswith("/run/pgbouncer/")
    pg = values["postgresql"]
    assert values["postgresql"]["postgresqlDatabase"] in ini["databases"]
    assert int(ini["pgbouncer"]["listen_port"]) == pg["service"]["port"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["PGUSER"]["value"] == pg["postgresqlUsername"]
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == values["global"]["postgresqlSecretName"]
    assert service["metadata"]["name"] == "cosyvoice-pgbouncer" and "cosyvoice-pgbouncer" in (
        (K8S / "helm" / "values.yaml").read_text())
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    for component in ("dagsterDaemon", "dagsterWebserver"):  # the processes that create runs
        env = {e["name"]: e["value"] for e in values[component]["env"]}
        assert env["DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS"] == "true", component


def test_pool_limits_job_uses_the_charts_instance_config_map_and_our_cli():
    job = yaml.safe_load((K8S / "pool-limits-job.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    assert pod["volumes"][0]["configMap"]["name"] == "cosyvoice-dagster-instance"
    assert pod["containers"][0]["command"][:3] == ["python", "-m", "pipelines.instance"]
    from pipelines.instance import main

    with pytest.raises(SystemExit):  # the flags the Job passes exist
        main(["--no-yaml", "--home", "/nonexistent", "--help"])


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_copy_existing_paths_and_serve_our_code_location(dockerfile):
    text = (K8S / dockerfile).read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"{dockerfile}: COPY {source} does not exist"
    assert '"-m", "pipelines.definitions"' in text and "USER 10001" in text
    assert text.count("FROM ") == 1 and "python:3.11" in text


def test_multi_node_training_manifests_validate_and_wire_node_0_to_the_workers(tmp_path):
    """The Service, the workers' Indexed Job and node 0's Pipes pod of a 4-node run: valid objects,
    the Service selects node 0's pod, the workers get node ranks 1..3 and the same arguments."""
    import os
    import subprocess
    import sys

    from dagster_k8s.pipes import build_pod_body

    from assets.training import TrainConfig, train_options
    from pipelines.k8s import training_pod_spec
    from pipelines.launchers import K8sLauncher
    from pipelines.multinode import MultiNodeLayout
    from pipelines.resources import TrainingResource

    layout = MultiNodeLayout("cv-train-0123abcd", 4, "cosyvoice")
    training = TrainingResource(model_dir="/models/llm")
    launcher = K8sLauncher(image="registry.example.com/gpu:1")
    options = train_options(TrainConfig(nodes=4, gpus_per_node=8), training, "0123abcd", "s3://b/train list", "s3://b/cv")
    command = launcher.command(options.to_argv(), gpus_per_node=8, nodes=4, rdzv_endpoint=layout.rdzv_endpoint)
    spec = training_pod_spec(8, volume_claim="cosyvoice-models", credentials_secret=launcher.credentials_secret)
    service, job = layout.service(), layout.worker_job(image=launcher.image, command=command,
                                                       env={"AWS_DEFAULT_REGION": "x"}, pod_spec=spec)
    pod = build_pod_body(pod_name="dagster-pipes-train", image=launcher.image, command=command,
                         env_vars={"DAGSTER_PIPES_CONTEXT": "e30="}, base_pod_meta=layout.node0_pod_meta(),
                         base_pod_spec=layout.node0_pod_spec(spec))
    pod = {"apiVersion": "v1", "kind": "Pod", **kubernetes.client.ApiClient().sanitize_for_serialization(pod)}
    for manifest in (service, job, pod):
        validate(manifest)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert f"{pod['spec']['hostname']}.{pod['spec']['subdomain']}:29400" == layout.rdzv_endpoint
    assert not service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 3
    worker = job["spec"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 8 and worker["image"] == launcher.image
    assert worker["envFrom"] == pod["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "cosyvoice-s3"}}]

    # run the worker's command line through a real shell, with a stand-in for python that prints argv
    echo = tmp_path / "python"
    echo.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    echo.chmod(0o755)
    argv = [str(echo)] + worker["command"][4:]
    shell = worker["command"][:3] + argv
    for index in range(3):
        out = subprocess.run(shell, env={**os.environ, "JOB_COMPLETION_INDEX": str(index)}, capture_output=True,
                             text=True, check=True).stdout
        node_args = json.loads(out)
        assert node_args[:3] == ["-m", "torch.distributed.run", f"--node_rank={index + 1}"]
        assert node_args[3:] == [a for a in command[3:] if a != "--node_rank=0"]
