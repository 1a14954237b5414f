"""Multi-node training on Kubernetes: node 0 is the Pipes pod, nodes 1..N-1 an Indexed Job.

``PipesK8sClient`` launches one pod and reads Dagster Pipes messages from it, and only global rank 0
of the trainer reports. So node 0 must be that pod, deterministically: torchrun's *static*
rendezvous with explicit node ranks (with c10d the ranks go to whichever node joins first). Node 0
gets a stable DNS name through a headless Service (``hostname`` + ``subdomain``); the other nodes
run the same torchrun command with ``--node_rank = JOB_COMPLETION_INDEX + 1`` and connect to it.
The Service and the Job exist only for the run: they are created before the Pipes pod and deleted
when it ends, whatever the outcome.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipelines.k8s import literal_env

RDZV_PORT = 29400
RUN_LABEL = "cosyvoice.io/train-run"
NODE_LABEL = "cosyvoice.io/train-node"
NODE0_HOSTNAME = "node-0"


def run_resource_name(run_id: str, model: str = "llm", prefix: str = "cv-train") -> str:
    """A DNS-1123 label unique to the run and the trained model (Service, Job and label value): one
    ``retrain`` run may train the LLM, the flow and the vocoder on several nodes at once."""
    return f"{prefix}-{re.sub(r'[^a-z0-9]', '', model.lower())}-{re.sub(r'[^a-z0-9]', '', run_id.lower())[:12]}"


@dataclass(frozen=True)
class MultiNodeLayout:
    name: str
    nodes: int
    namespace: str = "default"

    def __post_init__(self):
        if self.nodes < 2:
            raise ValueError(f"a multi-node layout needs nodes >= 2, got {self.nodes}")
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", self.name):
            raise ValueError(f"{self.name!r} is not a DNS-1123 label")

    @property
    def rdzv_endpoint(self) -> str:
        """Node 0's address as the other pods resolve it (``<hostname>.<subdomain>`` in the namespace)."""
        return f"{NODE0_HOSTNAME}.{self.name}:{RDZV_PORT}"

    def labels(self, node: str) -> dict[str, str]:
        return {RUN_LABEL: self.name, NODE_LABEL: node, "app.kubernetes.io/part-of": "cosyvoice-pipeline"}

    def node0_pod_meta(self) -> dict:
        return {"labels": self.labels("0")}

    def node0_pod_spec(self, base: dict) -> dict:
        """``base_pod_spec`` of the Pipes pod, resolvable as ``node-0.<name>``."""
        return {**base, "hostname": NODE0_HOSTNAME, "subdomain": self.name}

    def service(self) -> dict:
        """Headless Service giving node 0 its DNS record, published before the pod is ready
        (the rendezvous starts before any readiness probe could pass)."""
        return {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": self.labels("0")},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {RUN_LABEL: self.name, NODE_LABEL: "0"},
                     "ports": [{"name": "rendezvous", "port": RDZV_PORT, "targetPort": RDZV_PORT}]},
        }

    def worker_job(self, *, image: str, command: list[str], env: dict[str, str], pod_spec: dict) -> dict:
        """Nodes 1..N-1: an Indexed Job running ``worker_command(command)`` with node 0's pod spec
        (GPUs, tolerations, volumes, the credentials Secret's ``envFrom``). No retries: a lost node
        fails the whole static rendezvous, and the Dagster step's retry policy restarts the run from
        its last checkpoint. ``env`` holds literal values only: a credential in it raises."""
        containers = [{**pod_spec["containers"][0], "name": "trainer", "image": image,
                       "command": worker_command(command), "env": literal_env(env)}]
        workers = self.nodes - 1
        return {
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": self.labels("workers")},
            "spec": {
                "completionMode": "Indexed", "completions": workers, "parallelism": workers,
                "backoffLimit": 0, "ttlSecondsAfterFinished": 3600,
                "template": {"metadata": {"labels": self.labels("workers")},
                             "spec": {**pod_spec, "restartPolicy": "Never", "containers": containers}},
            },
        }


def worker_command(command: list[str]) -> list[str]:
    """Node 0's ``python -m torch.distributed.run --node_rank=0 ...`` for the pod of Job index i:
    ``--node_rank`` becomes ``i + 1`` (a shell expansion of ``JOB_COMPLETION_INDEX``); every other
    argument is passed through ``"$@"`` untouched."""
    head = command[:3]
    if head[1:] != ["-m", "torch.distributed.run"]:
        raise ValueError(f"not a torchrun command: {command[:3]}")
    rest = [a for a in command[3:] if not a.startswith("--node_rank=")]
    script = 'exec "$0" -m torch.distributed.run --node_rank=$((JOB_COMPLETION_INDEX + 1)) "$@"'
    return ["/bin/sh", "-c", script, head[0], *rest]


class WorkerNodes:
    """Creates the Service and the worker Job on enter and deletes both on exit."""

    def __init__(self, layout: MultiNodeLayout, job: dict, *, core_api=None, batch_api=None):
        if core_api is None or batch_api is None:
            import kubernetes

            try:
                kubernetes.config.load_incluster_config()
            except kubernetes.config.ConfigException:
                kubernetes.config.load_kube_config()
            core_api = core_api or kubernetes.client.CoreV1Api()
            batch_api = batch_api or kubernetes.client.BatchV1Api()
        self.layout, self.job, self.core, self.batch = layout, job, core_api, batch_api

    def __enter__(self) -> WorkerNodes:
        namespace = self.layout.namespace
        self.core.create_namespaced_service(namespace, self.layout.service())
        try:
            self.batch.create_namespaced_job(namespace, self.job)
        except Exception:
            self.core.delete_namespaced_service(self.layout.name, namespace)
            raise
        return self

    def __exit__(self, *exc) -> None:
        namespace = self.layout.namespace
        try:  # the workers' pods go with the Job ("Background": do not wait for them)
            self.batch.delete_namespaced_job(self.layout.name, namespace, propagation_policy="Background")
        finally:
            self.core.delete_namespaced_service(self.layout.name, namespace)
