"""Launchers: *how* and *where* a stage's processes run, one resource per deployment.

The assets decide *what* runs (the trainer's options, the engine's build flags) and hand it to the
launcher resource they were given; they never branch on the deployment. ``pipelines/resources.py``
picks the launchers of a deployment (``resources_for``):

* embedded: :class:`SubprocessLauncher` (``torchrun`` / ``python -m cosyvoice.cli`` on this
  machine through ``PipesSubprocessClient``) and :class:`LocalEngineBuilder` (``trtllm-build`` on
  this machine, which fails at once outside the TensorRT-LLM container).
* distributed: :class:`K8sLauncher` (a GPU pod through ``PipesK8sClient``; for several nodes that
  pod is node 0 and the others run as an Indexed Job next to it, ``pipelines/multinode.py``) and
  :class:`K8sEngineBuilder` (the pod of ``k8s/trtllm-engine-job.yaml`` through ``PipesK8sClient``).

The Kubernetes shapes (pod specs) live in ``pipelines/k8s.py``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import dagster as dg

from cosyvoice.export.trtllm import CONTAINER_IMAGE
from pipelines.k8s import engine_pod_spec, training_pod_spec, without_credentials

#: the checkout (or the image's WORKDIR): where the subprocess launcher runs, where relative recipe paths resolve
PROJECT_ROOT = Path(__file__).resolve().parents[1]

#: what the trainer needs from the orchestrator's environment (storage endpoint, credentials, offline HF)
TRAINER_ENV = ["COSYVOICE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "HF_HUB_OFFLINE"]


def environ_subset(names: Sequence[str]) -> dict[str, str]:
    """The variables ``names`` as set in this process (unset ones left out)."""
    return {k: os.environ[k] for k in names if k in os.environ}


def torchrun_command(python: str, cli_args: Sequence[str], *, gpus_per_node: int = 1, nodes: int = 1,
                     rdzv_endpoint: str = "", rdzv_id: str = "cosyvoice-llm") -> list[str]:
    """``cosyvoice-pipeline <cli_args>`` as node 0 runs it: plain ``python -m cosyvoice.cli`` for one
    process, ``torchrun --standalone`` for one node, and for several nodes torchrun's static
    rendezvous at ``rdzv_endpoint`` with ``--node_rank=0``. Static, not c10d: this is the node
    Dagster listens to, so it must hold global rank 0, the rank that reports; the other nodes run
    the same command with their own ``--node_rank``."""
    if nodes > 1 and not rdzv_endpoint:
        raise ValueError("nodes > 1 needs rdzv_endpoint (host:port of the first node)")
    if gpus_per_node == 1 and nodes == 1:
        return [python, "-m", "cosyvoice.cli", *cli_args]
    command = [python, "-m", "torch.distributed.run", f"--nproc_per_node={gpus_per_node}", f"--nnodes={nodes}"]
    if nodes > 1:
        command += ["--rdzv_backend=static", f"--rdzv_endpoint={rdzv_endpoint}", "--node_rank=0",
                    f"--rdzv_id={rdzv_id}"]
    else:
        command += ["--standalone"]
    return command + ["-m", "cosyvoice.cli", *cli_args]


class Launcher(dg.ConfigurableResource):
    """Runs ``cosyvoice-pipeline <cli_args>`` on ``nodes`` x ``gpus_per_node`` processes through
    Dagster Pipes and returns the completed invocation (its custom messages and materialize result
    are what rank 0 reported). ``env_passthrough``: the variables of this process the command gets."""

    python: str = "python"
    env_passthrough: list[str] = TRAINER_ENV
    run_name: str = "cosyvoice-llm"  # torchrun's rendezvous id

    def forwarded_env(self) -> dict[str, str]:
        """``env_passthrough`` as set in this process."""
        return environ_subset(self.env_passthrough)

    def command(self, cli_args: Sequence[str], *, gpus_per_node: int = 1, nodes: int = 1,
                rdzv_endpoint: str = "") -> list[str]:
        """Node 0's command line (:func:`torchrun_command`)."""
        return torchrun_command(self.python, cli_args, gpus_per_node=gpus_per_node, nodes=nodes,
                                rdzv_endpoint=rdzv_endpoint, rdzv_id=self.run_name)

    def launch(self, context: dg.AssetExecutionContext, cli_args: Sequence[str], *, gpus_per_node: int = 1,
               nodes: int = 1, rdzv_endpoint: str = "") -> dg.PipesClientCompletedInvocation:
        """Implemented by each deployment's launcher (:class:`SubprocessLauncher`, :class:`K8sLauncher`)."""
        raise NotImplementedError(f"{type(self).__name__} is not a launcher")


class SubprocessLauncher(Launcher):
    """This machine: ``PipesSubprocessClient`` in the project root (relative recipe paths resolve
    there), with ``env_passthrough`` including the credentials (the process is ours). Several nodes:
    this process is node 0 at ``rdzv_endpoint``; start the others by hand with the logged command."""

    python: str = sys.executable

    def launch(self, context, cli_args, *, gpus_per_node=1, nodes=1, rdzv_endpoint=""):
        command = self.command(cli_args, gpus_per_node=gpus_per_node, nodes=nodes, rdzv_endpoint=rdzv_endpoint)
        context.log.info("launching: %s", " ".join(command))
        if nodes > 1:
            context.log.info("start nodes 1..%d with the same command and --node_rank=1..%d", nodes - 1, nodes - 1)
        return dg.PipesSubprocessClient(cwd=str(PROJECT_ROOT)).run(context=context, command=command,
                                                              env=self.forwarded_env())


class K8sLauncher(Launcher):
    """A GPU pod (:func:`pipelines.k8s.training_pod_spec`) through ``PipesK8sClient``; the
    orchestrating step needs no GPU. Several nodes: the pod is node 0 and nodes 1..N-1 run as an
    Indexed Job for the duration of the run (``pipelines/multinode.py``), rendezvous at node 0's
    stable DNS name (any ``rdzv_endpoint`` passed in is replaced by it).

    Credentials: only the non-credential part of ``env_passthrough`` is written into the specs; the
    credentials reach the pods from the Kubernetes Secret ``credentials_secret`` (``envFrom``, keys =
    variable names: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY[, AWS_SESSION_TOKEN,
    COSYVOICE_S3_ENDPOINT_URL]); ``""`` = no Secret (the pods get an identity another way, e.g.
    IRSA / workload identity). ``volume_claim``: the PVC mounted at ``/models`` (the model dir)."""

    image: str
    namespace: str = ""
    volume_claim: str = ""
    credentials_secret: str = "cosyvoice-s3"

    def pod_env(self) -> dict[str, str]:
        """What is written into pod and Job specs: :meth:`forwarded_env` without any credential."""
        return without_credentials(self.forwarded_env())

    def pod_spec(self, gpus: int) -> dict:
        return training_pod_spec(gpus, volume_claim=self.volume_claim, credentials_secret=self.credentials_secret)

    def launch(self, context, cli_args, *, gpus_per_node=1, nodes=1, rdzv_endpoint=""):
        from dagster_k8s import PipesK8sClient

        if nodes > 1:
            return self._launch_nodes(context, cli_args, gpus_per_node=gpus_per_node, nodes=nodes)
        command = self.command(cli_args, gpus_per_node=gpus_per_node)
        context.log.info("launching: %s", " ".join(command))
        return PipesK8sClient().run(context=context, image=self.image, command=command,
                                    namespace=self.namespace or None, base_pod_spec=self.pod_spec(gpus_per_node),
                                    env=self.pod_env())

    def _launch_nodes(self, context, cli_args, *, gpus_per_node: int, nodes: int):
        """Node 0 as the Pipes pod, nodes 1..N-1 as an Indexed Job, for the duration of the run."""
        from dagster_k8s import PipesK8sClient

        from pipelines.multinode import MultiNodeLayout, WorkerNodes, run_resource_name

        model = cli_args[cli_args.index("--model") + 1] if "--model" in cli_args else "llm"
        layout = MultiNodeLayout(run_resource_name(context.run.run_id, model), nodes, self.namespace or "default")
        command = self.command(cli_args, gpus_per_node=gpus_per_node, nodes=nodes, rdzv_endpoint=layout.rdzv_endpoint)
        pod_spec = self.pod_spec(gpus_per_node)
        job = layout.worker_job(image=self.image, command=command, env=self.pod_env(), pod_spec=pod_spec)
        context.log.info("launching node 0: %s", " ".join(command))
        context.log.info("nodes 1..%d: Job %s/%s; rendezvous at %s", nodes - 1, layout.namespace, layout.name,
                         layout.rdzv_endpoint)
        with WorkerNodes(layout, job):
            return PipesK8sClient().run(
                context=context, image=self.image, command=command, namespace=layout.namespace,
                base_pod_meta=layout.node0_pod_meta(), base_pod_spec=layout.node0_pod_spec(pod_spec),
                env=self.pod_env())


class EngineBuilder(dg.ConfigurableResource):
    """Runs ``trtllm-build`` on a TensorRT-LLM checkpoint and publishes the engine folder to
    ``out``; returns the materialization of ``trtllm_engine``."""

    def build(self, context: dg.AssetExecutionContext, checkpoint: str, out: str, *, max_batch_size: int,
              max_num_tokens: int, gemm_plugin: str) -> dg.MaterializeResult:
        raise NotImplementedError(f"{type(self).__name__} is not an engine builder")


class LocalEngineBuilder(EngineBuilder):
    """``trtllm-build`` on this machine's PATH: works inside the TensorRT-LLM container, and
    anywhere else fails at once naming the image (:class:`cosyvoice.export.engine.EngineBuildUnavailable`)."""

    def build(self, context, checkpoint, out, *, max_batch_size, max_num_tokens, gemm_plugin):
        from cosyvoice.export.engine import build_engine

        report = build_engine(checkpoint, out, max_batch_size=max_batch_size, max_num_tokens=max_num_tokens,
                              gemm_plugin=gemm_plugin)
        context.log.info(report.summary())
        return dg.MaterializeResult(metadata=report.as_metadata())


class K8sEngineBuilder(EngineBuilder):
    """The pod of ``k8s/trtllm-engine-job.yaml`` (:func:`pipelines.k8s.engine_pod_spec`) through
    ``PipesK8sClient``: fetch the checkpoint (``pipeline_image``), build on a GPU (``trtllm_image``),
    publish from the Pipes container. Credentials come from the template's Secret (``envFrom``);
    ``env_passthrough`` (non-credential settings only) is written in as values."""

    trtllm_image: str = CONTAINER_IMAGE
    pipeline_image: str = "cosyvoice-pipeline:latest"
    namespace: str = ""
    env_passthrough: list[str] = ["COSYVOICE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"]

    def pod_spec(self, checkpoint: str, *, max_batch_size: int, max_num_tokens: int, gemm_plugin: str) -> dict:
        return engine_pod_spec(checkpoint, trtllm_image=self.trtllm_image, pipeline_image=self.pipeline_image,
                               env=environ_subset(self.env_passthrough), max_batch_size=max_batch_size, max_num_tokens=max_num_tokens,
                               gemm_plugin=gemm_plugin)

    def build(self, context, checkpoint, out, *, max_batch_size, max_num_tokens, gemm_plugin):
        from dagster_k8s import PipesK8sClient

        spec = self.pod_spec(checkpoint, max_batch_size=max_batch_size, max_num_tokens=max_num_tokens,
                             gemm_plugin=gemm_plugin)
        return PipesK8sClient().run(
            context=context, image=self.pipeline_image, namespace=self.namespace or None,
            command=["python", "-m", "cosyvoice.export.transfer", "put", "/work/engine", out, "--pipes"],
            base_pod_spec=spec).get_materialize_result()
