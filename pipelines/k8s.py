"""Kubernetes settings of GPU steps (``dagster-k8s/config`` op tags), read by ``k8s_job_executor``.

A GPU step's Job requests ``nvidia.com/gpu``, lands on GPU nodes (node selector) and tolerates
their taint. Clusters differ in how GPU nodes are labelled and tainted, so both come from the
environment of the code server (JSON): ``COSYVOICE_GPU_NODE_SELECTOR`` (default
``{"nvidia.com/gpu.present": "true"}``, the NVIDIA GPU operator's label) and
``COSYVOICE_GPU_TOLERATIONS`` (default: tolerate ``nvidia.com/gpu`` NoSchedule taints).
``COSYVOICE_GPU_IMAGE`` runs GPU steps from the GPU image (k8s/Dockerfile.gpu) instead of the
run's CPU image.
"""

import json
import os

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
