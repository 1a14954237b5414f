"""Executors per deployment (``COSYVOICE_DEPLOYMENT``).

* ``embedded``: the multiprocess executor (one process per step on this machine; at most
  ``COSYVOICE_MAX_CONCURRENT_STEPS`` at once, default: one per core), or with
  ``COSYVOICE_EXECUTOR=in_process`` every run's steps in the run's own process (small machines:
  no per-step interpreter start-up).
* ``distributed``: ``k8s_job_executor`` -- every step is its own Kubernetes Job built from the run
  pod's image, namespace, env secrets and config maps (set by the Helm chart's K8sRunLauncher).
  GPU steps add their ``dagster-k8s/config`` op tags (GPU limit, node selector, tolerations);
  ``step_k8s_config`` below is the default for every step. Needs ``K8sRunLauncher`` on the instance.
"""

import os

import dagster as dg
from dagster_k8s import k8s_job_executor

#: defaults for every step Job; op tags of GPU assets are merged on top (DEEP merge)
STEP_K8S_CONFIG = {
    "container_config": {"resources": {"requests": {"cpu": "2", "memory": "8Gi"},
                                       "limits": {"memory": "16Gi"}}},
    "job_spec_config": {"ttl_seconds_after_finished": 86400, "backoff_limit": 0},
}


def executor_for(name: str) -> dg.ExecutorDefinition:
    if name == "distributed":
        return k8s_job_executor.configured({
            "max_concurrent": int(os.environ.get("COSYVOICE_K8S_MAX_CONCURRENT_STEPS", "16")),
            "step_k8s_config": STEP_K8S_CONFIG,
        }, name="cosyvoice_k8s_job_executor")
    kind = os.environ.get("COSYVOICE_EXECUTOR", "multiprocess")
    if kind not in ("multiprocess", "in_process"):
        raise ValueError(f"COSYVOICE_EXECUTOR must be 'multiprocess' or 'in_process', got {kind!r}")
    if kind == "in_process":
        return dg.in_process_executor
    steps = os.environ.get("COSYVOICE_MAX_CONCURRENT_STEPS")
    if steps:
        return dg.multiprocess_executor.configured({"max_concurrent": int(steps)}, name="cosyvoice_multiprocess")
    return dg.multiprocess_executor
