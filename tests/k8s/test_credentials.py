"""Credentials reach pods only through a Kubernetes Secret: no spec we generate (the training Pipes
pod, the multi-node Service and worker Job, the TRT-LLM engine pod) and no manifest or Helm value
under k8s/ holds a credential's value."""

import json
from pathlib import Path

import dagster as dg
import kubernetes
import kubernetes_validate
import pytest
import yaml

from pipelines.k8s import is_credential, literal_env

K8S = Path(__file__).resolve().parents[2] / "k8s"
FAKE = {"AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID0000001", "AWS_SECRET_ACCESS_KEY": "fake+secret/access-key-0000001",
        "AWS_SESSION_TOKEN": "fake-session-token-0000001"}
PLAIN = {"AWS_DEFAULT_REGION": "eu-west-3", "COSYVOICE_S3_ENDPOINT_URL": "http://127.0.0.1:9000"}


@pytest.fixture
def credentials_in_env(monkeypatch):
    for name, value in {**FAKE, **PLAIN}.items():
        monkeypatch.setenv(name, value)


def serialized(manifest: dict) -> str:
    return json.dumps(kubernetes.client.ApiClient().sanitize_for_serialization(manifest))


def assert_no_credential_values(name: str, manifest: dict) -> None:
    text = serialized(manifest)
    leaked = [k for k, v in FAKE.items() if v in text]
    assert not leaked, f"{name} holds the value of {leaked}"


def pipes_pod(kwargs: dict) -> dict:
    """The pod PipesK8sClient.run creates from the arguments our asset passed (its own build_pod_body)."""
    from dagster_k8s.pipes import build_pod_body

    pod = build_pod_body(pod_name="dagster-pipes-train", image=kwargs["image"], command=kwargs["command"],
                         env_vars={"DAGSTER_PIPES_CONTEXT": "e30=", **(kwargs.get("env") or {})},
                         base_pod_meta=kwargs.get("base_pod_meta"), base_pod_spec=kwargs["base_pod_spec"])
    return {"apiVersion": "v1", "kind": "Pod", **kubernetes.client.ApiClient().sanitize_for_serialization(pod)}


@pytest.mark.parametrize("nodes", [1, 3])
def test_training_specs_reference_the_credentials_secret_and_hold_no_credential_value(
        nodes, credentials_in_env, monkeypatch, tmp_path, fake_kubernetes):
    """llm_checkpoint on the k8s launcher, with credentials in the orchestrator's environment: every
    object it creates (Pipes pod; for several nodes also the Service and the workers' Job) is valid,
    gets the credentials by reference to the configured Secret and contains none of their values."""
    from dagster_k8s import PipesK8sClient

    from assets.training import TrainConfig, llm_checkpoint
    from pipelines.launchers import K8sLauncher
    from pipelines.resources import DataStore, TrainingResource

    fake = fake_kubernetes
    launched = {}

    def run(self, **kwargs):
        launched.update(kwargs)
        raise RuntimeError("no cluster here")

    monkeypatch.setattr(PipesK8sClient, "run", run)
    for name in ("train.data.list", "cv.data.list"):
        (tmp_path / name).write_text("s3://bucket/shard-0.tar\n")
    launcher = K8sLauncher(image="registry.example.com/gpu:1", namespace="cosyvoice", volume_claim="cosyvoice-models",
                           credentials_secret="team-storage-credentials")
    result = dg.materialize([llm_checkpoint], resources={"store": DataStore(root=str(tmp_path)),
                                                         "training": TrainingResource(model_dir="/models/llm"),
                                                         "train_launcher": launcher},
                            run_config=dg.RunConfig(ops={"llm_checkpoint": TrainConfig(nodes=nodes, gpus_per_node=2)}),
                            raise_on_error=False)
    assert not result.success and launched, "the asset did not reach the pod launch"
    manifests = [("pod", pipes_pod(launched))] + [(body["kind"], body) for body in fake.created]
    assert [kind for kind, _ in manifests] == (["pod"] if nodes == 1 else ["pod", "Service", "Job"])
    for kind, manifest in manifests:
        kubernetes_validate.validate(manifest, "1.33.0", strict=True)
        assert_no_credential_values(kind, manifest)
    pods = [manifests[0][1]["spec"]] + [m["spec"]["template"]["spec"] for k, m in manifests if k == "Job"]
    for pod in pods:
        (container,) = pod["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": "team-storage-credentials"}}]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["AWS_DEFAULT_REGION"] == "eu-west-3"  # non-secret settings still travel as values
        assert not set(FAKE) & set(env)


def test_without_a_secret_the_pod_gets_no_credentials_at_all(credentials_in_env):
    from pipelines.k8s import training_pod_spec
    from pipelines.launchers import K8sLauncher, SubprocessLauncher

    launcher = K8sLauncher(image="registry.example.com/gpu:1", credentials_secret="")
    assert "envFrom" not in training_pod_spec(1, credentials_secret=launcher.credentials_secret)["containers"][0]
    assert "envFrom" not in launcher.pod_spec(1)["containers"][0]
    assert launcher.pod_env() == {"AWS_DEFAULT_REGION": "eu-west-3", "COSYVOICE_S3_ENDPOINT_URL": "http://127.0.0.1:9000"}
    assert set(FAKE) <= set(SubprocessLauncher().forwarded_env())  # the local trainer subprocess still gets them


def test_a_credential_is_never_written_as_a_literal_value():
    from pipelines.multinode import MultiNodeLayout

    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "PGPASSWORD", "aws_access_key_id"):
        assert is_credential(name)
    for name in ("AWS_DEFAULT_REGION", "COSYVOICE_S3_ENDPOINT_URL", "HF_HUB_OFFLINE"):
        assert not is_credential(name)
    with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY.*Secret"):
        literal_env({"AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "y"})
    command = ["python", "-m", "torch.distributed.run", "--node_rank=0", "-m", "cosyvoice.cli", "train"]
    with pytest.raises(ValueError, match="AWS_ACCESS_KEY_ID"):
        MultiNodeLayout("cv-train-x", 2).worker_job(image="x", command=command, env={"AWS_ACCESS_KEY_ID": "AKIA"},
                                                    pod_spec={"containers": [{"name": "c"}]})


def test_the_engine_pod_holds_no_credential_value(credentials_in_env):
    from pipelines.launchers import K8sEngineBuilder

    spec = K8sEngineBuilder().pod_spec("s3://bucket/export/trtllm/bf16", max_batch_size=16, max_num_tokens=32768,
                                       gemm_plugin="bfloat16")
    assert_no_credential_values("trtllm_engine pod", spec)
    for container in spec["initContainers"] + spec["containers"]:
        if container.get("env"):
            assert any("secretRef" in ref for ref in container.get("envFrom", [])), container["name"]


def env_lists(node, path=""):
    """Every container-style ``env`` list in a parsed YAML document, with where it is."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield f"{path}.env", value
            else:
                yield from env_lists(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from env_lists(value, f"{path}[{i}]")


def test_manifests_and_helm_values_take_credentials_only_from_secrets():
    files = sorted(K8S.rglob("*.y*ml"))
    assert K8S / "helm" / "values.yaml" in files
    checked = 0
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            for where, env in env_lists(doc):
                for entry in env:
                    if isinstance(entry, dict) and is_credential(entry.get("name", "")):
                        assert "value" not in entry and "secretKeyRef" in entry.get("valueFrom", {}), \
                            f"{path.name}{where}: {entry['name']} must come from a Secret (secretKeyRef)"
                        checked += 1
                    assert not (isinstance(entry, dict) and entry.get("value") in FAKE.values())
    assert checked >= 1  # the pool-limits Job's PostgreSQL password, by reference
