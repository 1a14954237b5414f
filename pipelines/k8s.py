"""Kubernetes settings of GPU steps (``dagster-k8s/config`` op tags), read by ``k8s_job_executor``.

A GPU step's Job requests ``nvidia.com/gpu``, lands on GPU nodes (node selector) and tolerates
their taint. Clusters differ in how GPU nodes are labelled and tainted, so both come from the
environment of the code server (JSON): ``COSYVOICE_GPU_NODE_SELECTOR`` (default
``{"nvidia.com/gpu.present": "true"}``, the NVIDIA GPU operator's label) and
``COSYVOICE_GPU_TOLERATIONS`` (default: tolerate ``nvidia.com/gpu`` NoSchedule taints).
``COSYVOICE_GPU_IMAGE`` runs GPU steps from the GPU image (k8s/Dockerfile.gpu) instead of the
run's CPU image.

Credentials never appear in a spec we generate: pods get them from a Kubernetes Secret
(:func:`credentials_env_from`), and :func:`literal_env` refuses to write a credential as a value.
"""

import json
import os
import re
from collections.abc import Mapping

DEFAULT_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
DEFAULT_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


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
