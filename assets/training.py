"""``llm_checkpoint`` (the trainer, launched through Dagster Pipes) and ``llm_averaged``.

Embedded deployment: ``PipesSubprocessClient`` runs ``torchrun ... cosyvoice-pipeline train`` on
this machine. Distributed: ``PipesK8sClient`` runs the same command in a GPU pod
(:func:`training_pod_spec`); the orchestrating step itself needs no GPU. Several nodes: that pod is
node 0 and the others run as an Indexed Job next to it (``pipelines/multinode.py``). Rank 0 of the
trainer streams one Pipes message per logged step (loss, lr, grad norm, tokens/s, MFU), which become
the loss-curve plot, and reports the final metadata.

Every run writes into its own ``<model_dir>/<run id>/`` (recorded as ``run_dir``). The blocking CV
gate compares with the *released* checkpoint, the newest materialization whose gate passed, and only
on the same ``cv.data.list`` (``cv_list_sha256``); ``llm_averaged`` averages that run's dir only.
"""

import hashlib
import math
import os
import sys
import tempfile
from dataclasses import dataclass

import dagster as dg

from assets._metadata import line_plot
from assets.shards import training_data_lists
from cosyvoice import storage
from cosyvoice.train.checkpoint import average_checkpoints
from pipelines.k8s import credentials_env_from, gpu_op_tags
from pipelines.resources import PROJECT_ROOT, DataStore, TrainingResource

TRAIN_CHECK = "cv_loss_finite_and_not_worse"
LLM_CHECKPOINT = dg.AssetKey("llm_checkpoint")


class TrainConfig(dg.Config):
    """Run configuration of one training run (Launchpad / schedule / CLI ``--config``)."""

    engine: str = "torch_ddp"  # torch_ddp | deepspeed
    gpus_per_node: int = 1
    nodes: int = 1
    rdzv_endpoint: str = ""  # host:port of node 0 for nodes > 1 (subprocess launcher; k8s makes its own)
    max_epoch: int | None = None
    dpo: bool = False
    ref_model: str = ""
    resume_from: str = ""  # a checkpoint .pt of an earlier run's dir (exact resume with its .state.pt)
    use_amp: bool = True
    batch_type: str = ""  # "" = the recipe's; "token" = token-budget packed batches
    max_tokens_in_batch: int | None = None
    num_workers: int = 2
    extra_args: list[str] = []
    cv_tolerance: float = 0.0  # allowed relative CV-loss increase over the last released checkpoint


def train_command(config: TrainConfig, training: TrainingResource, train_list: str, cv_list: str, *,
                  run_dir: str, rdzv_endpoint: str = "") -> list[str]:
    """The trainer invocation of node 0, writing into ``run_dir`` (this run's own directory, see
    :meth:`TrainingResource.run_dir`): plain ``python -m cosyvoice.cli train`` for one process,
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
            "--train_data", train_list, "--cv_data", cv_list, "--model_dir", run_dir,
            "--tensorboard_dir", os.path.join(run_dir, "tensorboard"),
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
                      volume_claim: str = "", credentials_secret: str = "") -> dict:
    """``base_pod_spec`` for ``PipesK8sClient``: GPUs requested and limited, the GPU-node
    toleration, a memory-backed /dev/shm for DataLoader workers and NCCL, the model-dir volume, and
    the storage credentials as a reference to the Secret ``credentials_secret`` (never as values)."""
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
    gpu = gpu_op_tags(gpus)["dagster-k8s/config"]["pod_spec_config"]  # the cluster's GPU node label and taint
    return {
        "restartPolicy": "Never",
        "nodeSelector": node_selector or gpu["node_selector"],
        "tolerations": gpu["tolerations"],
        "containers": [container],
        "volumes": volumes,
    }


def cv_list_sha256(url: str) -> str:
    """Fingerprint of the CV set: the sha256 of ``cv.data.list``'s bytes. CV losses are compared only
    between runs with the same fingerprint."""
    return hashlib.sha256(storage.read_bytes(url)).hexdigest()


@dataclass(frozen=True)
class ReleasedCheckpoint:
    """The last ``llm_checkpoint`` materialization whose CV gate passed: the baseline of the next
    gate and the checkpoints ``llm_averaged`` averages."""

    run_id: str
    run_dir: str | None  # None: materialized before training outputs were run-scoped
    cv_loss: float | None
    cv_list_sha256: str | None


def released_checkpoint(instance: dg.DagsterInstance) -> ReleasedCheckpoint | None:
    """The newest materialization of ``llm_checkpoint`` whose ``cv_loss_finite_and_not_worse``
    evaluation passed (a rejected run is never a baseline and never averaged); None if none has."""
    check_key = dg.AssetCheckKey(LLM_CHECKPOINT, TRAIN_CHECK)
    cursor = None
    while True:
        records = instance.event_log_storage.get_asset_check_execution_history(check_key, limit=50, cursor=cursor)
        for record in records:
            evaluation = record.event.asset_check_evaluation if record.event is not None else None
            if evaluation is None or not evaluation.passed:
                continue
            target = evaluation.target_materialization_data
            if target is None:
                raise dg.Failure(f"the passed {TRAIN_CHECK} evaluation of run {record.run_id} names no materialization")
            found = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=LLM_CHECKPOINT, storage_ids=[target.storage_id]), limit=1).records
            if not found:
                raise dg.Failure(f"the llm_checkpoint materialization {target.storage_id} (run {target.run_id}) that "
                                 f"passed {TRAIN_CHECK} is no longer in the event log")
            meta = {k: v.value for k, v in found[0].asset_materialization.metadata.items()}
            loss = meta.get("cv_loss")
            return ReleasedCheckpoint(run_id=target.run_id, run_dir=meta.get("run_dir"),
                                      cv_loss=float(loss) if loss is not None else None,
                                      cv_list_sha256=meta.get("cv_list_sha256"))
        if len(records) < 50:
            return None
        cursor = records[-1].id


def cv_gate(instance: dg.DagsterInstance, cv_loss: float | None, cv_sha256: str, tolerance: float = 0.0
            ) -> dg.AssetCheckResult:
    """``cv_loss_finite_and_not_worse``: the CV loss is finite and at most ``(1 + tolerance)`` times
    the released checkpoint's (:func:`released_checkpoint`), compared only when both were measured
    on the same CV list (same ``cv_list_sha256``). No released checkpoint, or a changed CV list:
    no baseline; the check passes on a finite loss and says why nothing was compared."""
    finite = cv_loss is not None and math.isfinite(cv_loss)
    baseline = released_checkpoint(instance)
    compared = baseline is not None and baseline.cv_loss is not None and baseline.cv_list_sha256 == cv_sha256
    if baseline is None:
        why = "no released checkpoint yet: this run sets the first baseline"
    elif baseline.cv_list_sha256 != cv_sha256:
        why = (f"the CV list changed since the released checkpoint of run {baseline.run_id} "
               f"(cv.data.list sha256 {baseline.cv_list_sha256 or 'not recorded'} -> {cv_sha256}): baseline reset, "
               "CV losses of different CV sets are not compared")
    elif baseline.cv_loss is None:
        why = f"the released checkpoint of run {baseline.run_id} recorded no CV loss: nothing to compare"
    else:
        why = f"compared with the released checkpoint of run {baseline.run_id} (CV loss {baseline.cv_loss:.6g})"
    not_worse = not compared or (finite and cv_loss <= baseline.cv_loss * (1 + tolerance))
    passed = bool(finite and not_worse)
    if not finite:
        verdict = f"rejected: CV loss {cv_loss} is not finite"
    elif not not_worse:
        verdict = (f"rejected: CV loss {cv_loss:.6g} is worse than the released {baseline.cv_loss:.6g} "
                   f"(tolerance {tolerance:g})")
    else:
        verdict = f"passed: CV loss {cv_loss:.6g}"
    return dg.AssetCheckResult(
        check_name=TRAIN_CHECK, passed=passed, description=f"{verdict}; {why}",
        metadata={"cv_loss": cv_loss if finite else float("nan"),
                  "baseline_cv_loss": baseline.cv_loss if compared else float("nan"),
                  "baseline_run_id": baseline.run_id if baseline is not None else "",
                  "baseline_reset": baseline is not None and baseline.cv_list_sha256 != cv_sha256,
                  "cv_list_sha256": cv_sha256})


@dg.asset(
    deps=[training_data_lists], group_name="training", kinds={"pytorch"}, pool="gpu",
    check_specs=[dg.AssetCheckSpec(TRAIN_CHECK, asset="llm_checkpoint", blocking=True,
                                   description="CV loss finite and not worse than the last released checkpoint "
                                               "measured on the same cv.data.list")],
)
def llm_checkpoint(context: dg.AssetExecutionContext, config: TrainConfig, store: DataStore,
                   training: TrainingResource) -> dg.MaterializeResult:
    """Trains the CosyVoice2/3 LLM on ``train.data.list`` / ``cv.data.list`` (SFT, or DPO) and
    leaves the upstream checkpoint files in this run's own ``<model_dir>/<run id>/``."""
    run_dir = training.run_dir(context.run.run_id)
    cv_list = store.url("cv.data.list")
    cv_sha256 = cv_list_sha256(cv_list)  # before training: the list the trainer evaluates on
    if training.launcher == "k8s" and config.nodes > 1:
        invocation = _run_multinode_on_k8s(context, config, training, store, run_dir)
    elif training.launcher == "k8s":
        from dagster_k8s import PipesK8sClient

        command = train_command(config, training, store.url("train.data.list"), cv_list, run_dir=run_dir)
        context.log.info("launching: %s", " ".join(command))
        invocation = PipesK8sClient().run(
            context=context, image=training.image, command=command, namespace=training.namespace or None,
            base_pod_spec=training_pod_spec(config.gpus_per_node, volume_claim=training.volume_claim,
                                            credentials_secret=training.credentials_secret),
            env=training.pod_env())
    else:
        command = train_command(config, training, store.url("train.data.list"), cv_list, run_dir=run_dir)
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
    metadata["run_dir"] = run_dir
    metadata["cv_list_sha256"] = cv_sha256
    metadata["engine"] = config.engine
    metadata["gpus"] = config.gpus_per_node * config.nodes
    if config.resume_from:
        metadata["resumed_from"] = config.resume_from
    return dg.MaterializeResult(metadata=metadata,
                                check_results=[cv_gate(context.instance, cv_loss, cv_sha256, config.cv_tolerance)])


def _run_multinode_on_k8s(context: dg.AssetExecutionContext, config: TrainConfig, training: TrainingResource,
                          store: DataStore, run_dir: str):
    """Node 0 as the Pipes pod, nodes 1..N-1 as an Indexed Job, for the duration of the run."""
    from dagster_k8s import PipesK8sClient

    from pipelines.multinode import MultiNodeLayout, WorkerNodes, run_resource_name

    layout = MultiNodeLayout(run_resource_name(context.run.run_id), config.nodes, training.namespace or "default")
    command = train_command(config, training, store.url("train.data.list"), store.url("cv.data.list"),
                            run_dir=run_dir, rdzv_endpoint=layout.rdzv_endpoint)
    pod_spec = training_pod_spec(config.gpus_per_node, volume_claim=training.volume_claim,
                                 credentials_secret=training.credentials_secret)
    job = layout.worker_job(image=training.image, command=command, env=training.pod_env(), pod_spec=pod_spec)
    context.log.info("launching node 0: %s", " ".join(command))
    context.log.info("nodes 1..%d: Job %s/%s; rendezvous at %s", config.nodes - 1, layout.namespace, layout.name,
                     layout.rdzv_endpoint)
    with WorkerNodes(layout, job):
        return PipesK8sClient().run(
            context=context, image=training.image, command=command, namespace=layout.namespace,
            base_pod_meta=layout.node0_pod_meta(), base_pod_spec=layout.node0_pod_spec(pod_spec),
            env=training.pod_env())


class AverageConfig(dg.Config):
    num: int = 5
    val_best: bool = True


@dg.asset(deps=[llm_checkpoint], group_name="training", kinds={"pytorch"})
def llm_averaged(context: dg.AssetExecutionContext, config: AverageConfig, store: DataStore,
                 training: TrainingResource) -> dg.MaterializeResult:
    """``<data root>/llm/llm.pt``: the average of the best (lowest CV loss) checkpoints of the
    released ``llm_checkpoint`` run (:func:`released_checkpoint`: the newest one whose CV gate
    passed), read from that run's own directory only; a plain state dict that loads strictly into
    the recipe's model (upstream ``average_model.py``)."""
    released = released_checkpoint(context.instance)
    if released is None:
        raise dg.Failure(f"no llm_checkpoint materialization has passed {TRAIN_CHECK}: nothing to average")
    if not released.run_dir:
        raise dg.Failure(f"the released llm_checkpoint (run {released.run_id}) records no run_dir: it predates "
                         "run-scoped training outputs; materialize llm_checkpoint again")
    latest = context.instance.get_latest_materialization_event(LLM_CHECKPOINT)
    if latest is not None and latest.run_id != released.run_id:
        context.log.warning("the latest llm_checkpoint (run %s) did not pass %s; averaging the released run %s",
                            latest.run_id, TRAIN_CHECK, released.run_id)
    run_dir = released.run_dir
    if not os.path.isdir(run_dir):
        raise dg.Failure(f"{run_dir}: the run dir of the released llm_checkpoint (run {released.run_id}) does not exist")
    available = len([f for f in os.listdir(run_dir) if f.startswith("epoch_") and f.endswith(".yaml")])
    num = min(config.num, available)
    with tempfile.TemporaryDirectory() as tmp:
        report = average_checkpoints(run_dir, os.path.join(tmp, "llm.pt"), num=num, val_best=config.val_best)
        with open(report.dst_model, "rb") as f:
            data = f.read()
    url = store.url("llm", "llm.pt")
    storage.write_bytes(url, data)
    return dg.MaterializeResult(metadata={
        "path": url, "averaged": len(report.sources), "bytes": len(data),
        "llm_checkpoint_run_id": released.run_id, "run_dir": run_dir,
        "sources": dg.MetadataValue.json([os.path.basename(p) for p in report.sources]),
        "cv_losses": dg.MetadataValue.json(report.losses),
    })


def default_python() -> str:
    return sys.executable
