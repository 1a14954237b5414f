"""``llm_checkpoint`` (the trainer, launched through Dagster Pipes) and ``llm_averaged``.

Embedded deployment: ``PipesSubprocessClient`` runs ``torchrun ... cosyvoice-pipeline train`` on
this machine. Distributed: ``PipesK8sClient`` runs the same command in a GPU pod
(:func:`training_pod_spec`); the orchestrating step itself needs no GPU. Several nodes: that pod is
node 0 and the others run as an Indexed Job next to it (``pipelines/multinode.py``). Rank 0 of the trainer streams one Pipes message per logged step
(loss, lr, grad norm, tokens/s, MFU), which become the loss-curve plot, and reports the final
metadata.
"""

import math
import os
import sys
import tempfile

import dagster as dg

from assets._metadata import line_plot
from assets.shards import training_data_lists
from cosyvoice import storage
from cosyvoice.train.checkpoint import average_checkpoints
from pipelines.k8s import gpu_op_tags
from pipelines.resources import PROJECT_ROOT, DataStore, TrainingResource

TRAIN_CHECK = "cv_loss_finite_and_not_worse"


class TrainConfig(dg.Config):
    """Run configuration of one training run (Launchpad / schedule / CLI ``--config``)."""

    engine: str = "torch_ddp"  # torch_ddp | deepspeed
    gpus_per_node: int = 1
    nodes: int = 1
    rdzv_endpoint: str = ""  # host:port of node 0 for nodes > 1 (subprocess launcher; k8s makes its own)
    max_epoch: int | None = None
    dpo: bool = False
    ref_model: str = ""
    resume_from: str = ""  # a checkpoint .pt in the model dir (exact resume with its .state.pt)
    use_amp: bool = True
    batch_type: str = ""  # "" = the recipe's; "token" = token-budget packed batches
    max_tokens_in_batch: int | None = None
    num_workers: int = 2
    extra_args: list[str] = []
    cv_tolerance: float = 0.0  # allowed relative CV-loss increase over the last published checkpoint


def train_command(config: TrainConfig, training: TrainingResource, train_list: str, cv_list: str, *,
                  rdzv_endpoint: str = "") -> list[str]:
    """The trainer invocation of node 0: plain ``python -m cosyvoice.cli train`` for one process,
    ``torchrun --standalone`` for one node, and for several nodes torchrun's static rendezvous at
    ``rdzv_endpoint`` (default: the config's) with ``--node_rank=0``. Static, not c10d: this is the
    node Dagster listens to, so it must hold global rank 0, the rank that reports; the other
    nodes run the same command with their own ``--node_rank``."""
    if config.engine not in ("torch_ddp", "deepspeed"):
        raise ValueError(f"engine must be torch_ddp or deepspeed, got {config.engine!r}")
    rdzv_endpoint = rdzv_endpoint or config.rdzv_endpoint
    if config.nodes > 1 and not rdzv_endpoint:
        raise ValueError("nodes > 1 needs rdzv_endpoint (host:port of the first node)")
    launcher = [training.python, "-m", "cosyvoice.cli"]
    if config.gpus_per_node > 1 or config.nodes > 1:
        launcher = [training.python, "-m", "torch.distributed.run", f"--nproc_per_node={config.gpus_per_node}",
                    f"--nnodes={config.nodes}"]
        if config.nodes > 1:
            launcher += ["--rdzv_backend=static", f"--rdzv_endpoint={rdzv_endpoint}", "--node_rank=0",
                         f"--rdzv_id={training.run_name}"]
        else:
            launcher += ["--standalone"]
        launcher += ["-m", "cosyvoice.cli"]
    args = ["train", "--model", "llm", "--train_engine", config.engine, "--config", training.recipe_path(),
            "--train_data", train_list, "--cv_data", cv_list, "--model_dir", training.model_dir,
            "--tensorboard_dir", os.path.join(training.model_dir, "tensorboard"),
            "--num_workers", str(config.num_workers), "--prefetch", "8"]
    if training.qwen_dir():
        args += ["--qwen_pretrain_path", training.qwen_dir()]
    if config.engine == "deepspeed":
        args += ["--deepspeed_config", training.deepspeed_config_path()]
    if config.use_amp:
        args += ["--use_amp"]
    if config.max_epoch is not None:
        args += ["--max_epoch", str(config.max_epoch)]
    if config.dpo:
        args += ["--dpo"] + (["--ref_model", config.ref_model] if config.ref_model else [])
    if config.resume_from:
        args += ["--checkpoint", config.resume_from]
    if config.batch_type:
        args += ["--batch_type", config.batch_type]
    if config.max_tokens_in_batch:
        args += ["--max_tokens_in_batch", str(config.max_tokens_in_batch)]
    return launcher + args + list(config.extra_args)


def training_pod_spec(gpus: int, *, node_selector: dict | None = None, shm_gi: int = 16,
                      volume_claim: str = "") -> dict:
    """``base_pod_spec`` for ``PipesK8sClient``: GPUs requested and limited, the GPU-node
    toleration, a memory-backed /dev/shm for DataLoader workers and NCCL, the model-dir volume."""
    container = {
        "name": "dagster-pipes-execution",
        "resources": {"limits": {"nvidia.com/gpu": gpus}, "requests": {"nvidia.com/gpu": gpus, "cpu": str(4 * gpus),
                                                                      "memory": f"{32 * gpus}Gi"}},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gi}Gi"}}]
    if volume_claim:
        container["volumeMounts"].append({"name": "models", "mountPath": "/models"})
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": volume_claim}})
    gpu = gpu_op_tags(gpus)["dagster-k8s/config"]["pod_spec_config"]  # the cluster's GPU node label and taint
    return {
        "restartPolicy": "Never",
        "nodeSelector": node_selector or gpu["node_selector"],
        "tolerations": gpu["tolerations"],
        "containers": [container],
        "volumes": volumes,
    }


def _previous_cv_loss(context: dg.AssetExecutionContext) -> float | None:
    event = context.instance.get_latest_materialization_event(context.asset_key)
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get("cv_loss")
    return float(value.value) if value is not None and value.value is not None else None


@dg.asset(
    deps=[training_data_lists], group_name="training", kinds={"pytorch"}, pool="gpu",
    check_specs=[dg.AssetCheckSpec(TRAIN_CHECK, asset="llm_checkpoint", blocking=True)],
)
def llm_checkpoint(context: dg.AssetExecutionContext, config: TrainConfig, store: DataStore,
                   training: TrainingResource) -> dg.MaterializeResult:
    """Trains the CosyVoice2/3 LLM on ``train.data.list`` / ``cv.data.list`` (SFT, or DPO) and
    leaves the upstream checkpoint files in the model dir."""
    if training.launcher == "k8s" and config.nodes > 1:
        invocation = _run_multinode_on_k8s(context, config, training, store)
    elif training.launcher == "k8s":
        from dagster_k8s import PipesK8sClient

        command = train_command(config, training, store.url("train.data.list"), store.url("cv.data.list"))
        context.log.info("launching: %s", " ".join(command))
        invocation = PipesK8sClient().run(
            context=context, image=training.image, command=command, namespace=training.namespace or None,
            base_pod_spec=training_pod_spec(config.gpus_per_node, volume_claim=training.volume_claim),
            env=training.forwarded_env())
    else:
        command = train_command(config, training, store.url("train.data.list"), store.url("cv.data.list"))
        context.log.info("launching: %s", " ".join(command))
        if config.nodes > 1:
            context.log.info("start nodes 1..%d with the same command and --node_rank=1..%d", config.nodes - 1,
                             config.nodes - 1)
        invocation = dg.PipesSubprocessClient(cwd=str(PROJECT_ROOT)).run(
            context=context, command=command, env=training.forwarded_env())
    steps = [m for m in invocation.get_custom_messages() if isinstance(m, dict) and m.get("tag") == "TRAIN"]
    cvs = [m for m in invocation.get_custom_messages() if isinstance(m, dict) and m.get("tag") == "CV"]
    reported = invocation.get_materialize_result()
    metadata = dict(reported.metadata or {})
    cv_loss = float(metadata["cv_loss"].value) if "cv_loss" in metadata and metadata["cv_loss"].value is not None else None
    if steps:
        metadata["loss_curve"] = line_plot({"train loss": ([m["step"] for m in steps], [m["loss"] for m in steps]),
                                            "cv loss": ([m["step"] for m in cvs], [m["loss"] for m in cvs])},
                                           title="LLM loss", xlabel="optimizer step")
        metadata["last_tokens_per_s"] = float(steps[-1].get("tokens_per_s", 0.0))
        if steps[-1].get("mfu") is not None:
            metadata["last_mfu"] = float(steps[-1]["mfu"])
    metadata["model_dir"] = training.model_dir
    metadata["engine"] = config.engine
    metadata["gpus"] = config.gpus_per_node * config.nodes
    previous = _previous_cv_loss(context)
    finite = cv_loss is not None and math.isfinite(cv_loss)
    not_worse = previous is None or (finite and cv_loss <= previous * (1 + config.cv_tolerance))
    return dg.MaterializeResult(
        metadata=metadata,
        check_results=[dg.AssetCheckResult(
            check_name=TRAIN_CHECK, passed=bool(finite and not_worse),
            metadata={"cv_loss": cv_loss if finite else float("nan"),
                      "previous_cv_loss": previous if previous is not None else float("nan")},
            description=None if finite and not_worse else
            f"CV loss {cv_loss} is not finite or worse than the last published {previous}")],
    )


def _run_multinode_on_k8s(context: dg.AssetExecutionContext, config: TrainConfig, training: TrainingResource,
                          store: DataStore):
    """Node 0 as the Pipes pod, nodes 1..N-1 as an Indexed Job, for the duration of the run."""
    from dagster_k8s import PipesK8sClient

    from pipelines.multinode import MultiNodeLayout, WorkerNodes, run_resource_name

    layout = MultiNodeLayout(run_resource_name(context.run.run_id), config.nodes, training.namespace or "default")
    command = train_command(config, training, store.url("train.data.list"), store.url("cv.data.list"),
                            rdzv_endpoint=layout.rdzv_endpoint)
    pod_spec = training_pod_spec(config.gpus_per_node, volume_claim=training.volume_claim)
    job = layout.worker_job(image=training.image, command=command, env=training.forwarded_env(), pod_spec=pod_spec)
    context.log.info("launching node 0: %s", " ".join(command))
    context.log.info("nodes 1..%d: Job %s/%s; rendezvous at %s", config.nodes - 1, layout.namespace, layout.name,
                     layout.rdzv_endpoint)
    with WorkerNodes(layout, job):
        return PipesK8sClient().run(
            context=context, image=training.image, command=command, namespace=layout.namespace,
            base_pod_meta=layout.node0_pod_meta(), base_pod_spec=layout.node0_pod_spec(pod_spec),
            env=training.forwarded_env())


class AverageConfig(dg.Config):
    num: int = 5
    val_best: bool = True


@dg.asset(deps=[llm_checkpoint], group_name="training", kinds={"pytorch"})
def llm_averaged(context: dg.AssetExecutionContext, config: AverageConfig, store: DataStore,
                 training: TrainingResource) -> dg.MaterializeResult:
    """``<data root>/llm/llm.pt``: the average of the best (lowest CV loss) checkpoints, a plain
    state dict that loads strictly into the recipe's model (upstream ``average_model.py``)."""
    available = len([f for f in os.listdir(training.model_dir) if f.startswith("epoch_") and f.endswith(".yaml")])
    num = min(config.num, available)
    with tempfile.TemporaryDirectory() as tmp:
        report = average_checkpoints(training.model_dir, os.path.join(tmp, "llm.pt"), num=num, val_best=config.val_best)
        with open(report.dst_model, "rb") as f:
            data = f.read()
    url = store.url("llm", "llm.pt")
    storage.write_bytes(url, data)
    return dg.MaterializeResult(metadata={
        "path": url, "averaged": len(report.sources), "bytes": len(data),
        "sources": dg.MetadataValue.json([os.path.basename(p) for p in report.sources]),
        "cv_losses": dg.MetadataValue.json(report.losses),
    })


def default_python() -> str:
    return sys.executable
