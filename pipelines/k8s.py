"""Kubernetes settings of GPU steps (``dagster-k8s/config`` op tags), read by ``k8s_job_executor``.

A GPU step's Job requests ``nvidia.com/gpu``, lands on GPU nodes (node selector) and tolerates
their taint. Clusters differ in how GPU nodes are labelled and tainted, so both come from the
environment of the code server (JSON): ``COSYVOICE_GPU_NODE_SELECTOR`` (default
``{"nvidia.com/gpu.present": "true"}``, the NVIDIA GPU operator's label) and
``COSYVOICE_GPU_TOLERATIONS`` (default: tolerate ``nvidia.com/gpu`` NoSchedule taints).
``COSYVOICE_GPU_IMAGE`` runs GPU steps from the GPU image (k8s/Dockerfile.gpu) instead of the
run's CPU image.

The pod specs of the Pipes launchers (``pipelines/launchers.py``) live here too: the trainer's
(:func:`training_pod_spec`) and the TensorRT-LLM engine build's (:func:`engine_pod_spec`).

Credentials never appear in a spec we generate: pods get them from a Kubernetes Secret
(:func:`credentials_env_from`), and :func:`literal_env` refuses to write a credential as a value.
"""

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import yaml

DEFAULT_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
DEFAULT_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
#: the engine build's Job; :func:`engine_pod_spec` launches its pod template through Pipes
ENGINE_JOB_MANIFEST = Path(__file__).resolve().parents[1] / "k8s" / "trtllm-engine-job.yaml"


def gpu_op_tags(gpus: int = 1, cpu: str = "8", memory: str = "32Gi") -> dict:
    """Op tags for a step that needs ``gpus`` GPUs (merged DEEP onto the executor's step defaults)."""
    container = {"resources": {"limits": {"nvidia.com/gpu": str(gpus), "memory": memory},
                               "requests": {"cpu": cpu, "memory": memory}}}
    image = os.environ.get("COSYVOICE_GPU_IMAGE")
    if image:
        container["image"] = image
    return {"dagster-k8s/config": {
        "container_config": container,
        "pod_spec_config": {
            "node_selector": json.loads(os.environ.get("COSYVOICE_GPU_NODE_SELECTOR") or "null") or DEFAULT_NODE_SELECTOR,
            "tolerations": json.loads(os.environ.get("COSYVOICE_GPU_TOLERATIONS") or "null") or DEFAULT_TOLERATIONS,
        },
    }}


#: names of environment variables that carry credentials (matched anywhere in the name, any case)
_CREDENTIAL_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY", re.IGNORECASE)


def is_credential(name: str) -> bool:
    """``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``HF_TOKEN``, ...: a
    variable that a pod may only receive through a Secret reference."""
    return bool(_CREDENTIAL_NAME.search(name))


def without_credentials(env: Mapping[str, str]) -> dict[str, str]:
    """The part of ``env`` that may be written into a pod or Job spec as literal values."""
    return {k: v for k, v in env.items() if not is_credential(k)}


def literal_env(env: Mapping[str, str]) -> list[dict]:
    """``env`` entries (``{"name", "value"}``) of a container; raises ``ValueError`` for a credential
    name, whose value would be readable by anyone who can read the spec (``kubectl get -o yaml``,
    the Dagster event log, etcd backups)."""
    leaked = sorted(k for k in env if is_credential(k))
    if leaked:
        raise ValueError(f"{', '.join(leaked)}: a credential is never written into a Kubernetes spec as a value; "
                         "put it into the Secret named by the resource's credentials_secret (envFrom) instead")
    return [{"name": k, "value": v} for k, v in sorted(env.items())]


def credentials_env_from(secret: str) -> list[dict]:
    """``envFrom`` of a container that needs the storage credentials: every key of the Secret
    ``secret`` (same namespace) becomes an environment variable. ``""``: none (the pod gets its
    identity another way, e.g. IRSA / workload identity). Not optional: while the Secret is missing the
    pod waits in ``CreateContainerConfigError`` (Dagster logs the message naming the Secret) instead of
    running without credentials."""
    return [{"secretRef": {"name": secret}}] if secret else []


def training_pod_spec(gpus: int, *, node_selector: dict | None = None, shm_gi: int = 16,
                      volume_claim: str = "", credentials_secret: str = "") -> dict:
    """``base_pod_spec`` of the trainer's pod (``PipesK8sClient``; also the workers' Job template):
    GPUs requested and limited, the GPU-node selector and toleration (:func:`gpu_op_tags`), a
    memory-backed /dev/shm for DataLoader workers and NCCL, the model-dir volume ``volume_claim``
    at ``/models``, and the storage credentials as a reference to the Secret ``credentials_secret``
    (never as values)."""
    container = {
        "name": "dagster-pipes-execution",
        "resources": {"limits": {"nvidia.com/gpu": gpus}, "requests": {"nvidia.com/gpu": gpus, "cpu": str(4 * gpus),
                                                                      "memory": f"{32 * gpus}Gi"}},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if credentials_secret:
        container["envFrom"] = credentials_env_from(credentials_secret)
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gi}Gi"}}]
    if volume_claim:
        container["volumeMounts"].append({"name": "models", "mountPath": "/models"})
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": volume_claim}})
    gpu = gpu_op_tags(gpus)["dagster-k8s/config"]["pod_spec_config"]
    return {
        "restartPolicy": "Never",
        "nodeSelector": node_selector or gpu["node_selector"],
        "tolerations": gpu["tolerations"],
        "containers": [container],
        "volumes": volumes,
    }


def engine_pod_spec(checkpoint_url: str, *, trtllm_image: str, pipeline_image: str, env: Mapping[str, str],
                    max_batch_size: int, max_num_tokens: int, gemm_plugin: str) -> dict:
    """``base_pod_spec`` of the TensorRT-LLM engine build (``PipesK8sClient``): the pod template of
    ``k8s/trtllm-engine-job.yaml`` with this run's checkpoint, ``trtllm-build`` flags and images;
    the publishing container is the Pipes one. ``env``: literal, non-credential values only (the
    template's containers get the credentials from its Secret)."""
    from cosyvoice.export.engine import build_command

    with open(ENGINE_JOB_MANIFEST) as f:
        spec = yaml.safe_load(f)["spec"]["template"]["spec"]  # parsed afresh: ours to modify
    values = literal_env(env)
    fetch, build = spec["initContainers"]
    fetch["image"] = pipeline_image
    fetch["env"] = [{"name": "CHECKPOINT_URL", "value": checkpoint_url}, *values]
    build["image"] = trtllm_image
    build["command"] = build_command("trtllm-build", "/work/checkpoint", "/work/engine", max_batch_size=max_batch_size,
                                     max_num_tokens=max_num_tokens, gemm_plugin=gemm_plugin)
    publish = spec["containers"][0]
    publish["name"] = "dagster-pipes-execution"
    publish.pop("command", None)
    publish["env"] = values
    return spec
