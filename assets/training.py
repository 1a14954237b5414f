"""``llm_checkpoint`` (the trainer, launched through Dagster Pipes) and ``llm_averaged``.

The asset decides *what* is trained: the trainer's :class:`~cosyvoice.train.options.TrainOptions`
(the run config's choices on the ``training`` resource's recipe, tokenizer and run dir). The
deployment's ``train_launcher`` resource decides *how*: ``torchrun ... cosyvoice-pipeline train`` on
this machine (embedded) or in GPU pods on Kubernetes, one pod per node (distributed; see
``pipelines/launchers.py``). Rank 0 of the trainer streams one Pipes message per logged step (loss,
lr, grad norm, tokens/s, MFU), which become the loss-curve plot, and reports the final metadata.

Every run writes into its own ``<model_dir>/<run id>/`` (recorded as ``run_dir``). The blocking CV
gate compares with the *released* checkpoint, the newest materialization whose gate passed, and only
on the same ``cv.data.list`` (``cv_list_sha256``); ``llm_averaged`` averages that run's dir only.
"""

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass

import dagster as dg
from pydantic import Field

from assets._metadata import line_plot
from assets.shards import training_data_lists
from cosyvoice import storage
from cosyvoice.stages import STAGES
from cosyvoice.train.checkpoint import average_checkpoints
from cosyvoice.train.options import BatchType, TrainEngine, TrainOptions
from pipelines.launchers import Launcher
from pipelines.resources import DataStore, TrainingResource

TRAIN_CHECK = "cv_loss_finite_and_not_worse"
LLM_CHECKPOINT = dg.AssetKey("llm_checkpoint")


class TrainConfig(dg.Config):
    """Run configuration of one training run (Launchpad / schedule / CLI ``--config``). Where the
    processes run is the deployment's ``train_launcher`` resource; what the trainer reads and where it
    writes is the ``training`` resource."""

    engine: TrainEngine = Field(default=TrainEngine.torch_ddp, description="torch_ddp or deepspeed "
                                "(DeepSpeed uses the training resource's deepspeed_config)")
    gpus_per_node: int = Field(default=1, description="trainer processes per node (torchrun --nproc_per_node)")
    nodes: int = Field(default=1, description="nodes; > 1: torchrun's static rendezvous, this node is rank 0")
    rdzv_endpoint: str = Field(default="", description="host:port of node 0 for nodes > 1 with the subprocess "
                               "launcher (the Kubernetes launcher makes its own)")
    max_epoch: int | None = Field(default=None, description="epochs (default: the recipe's)")
    dpo: bool = Field(default=False, description="DPO instead of SFT")
    ref_model: str = Field(default="", description="DPO reference model .pt (loaded strictly)")
    resume_from: str = Field(default="", description="a checkpoint .pt of an earlier run's dir "
                             "(exact resume with its .state.pt)")
    use_amp: bool = Field(default=True, description="bf16 autocast")
    batch_type: BatchType | None = Field(default=None, description="override the recipe's batch type "
                                         "(token: token-budget packed batches); empty: the recipe's")
    max_tokens_in_batch: int | None = Field(default=None, description="real LLM tokens per batch for batch_type token")
    num_workers: int = Field(default=2, description="DataLoader workers per trainer process")
    extra_args: list[str] = Field(default=[], description="further `cosyvoice-pipeline train` flags, appended as is")
    cv_tolerance: float = Field(default=0.0, description="allowed relative CV-loss increase over the last "
                                "released checkpoint")


def train_options(config: TrainConfig, training: TrainingResource, run_id: str, train_list: str,
                  cv_list: str) -> TrainOptions:
    """The trainer's options for run ``run_id``: the run config's choices on top of the training
    resource's recipe, tokenizer and run dir (:meth:`TrainingResource.options`)."""
    return training.options(run_id, train_list, cv_list, train_engine=config.engine, use_amp=config.use_amp,
                            num_workers=config.num_workers, prefetch=8, max_epoch=config.max_epoch, dpo=config.dpo,
                            ref_model=(config.ref_model or None) if config.dpo else None,
                            checkpoint=config.resume_from or None,
                            batch_type=config.batch_type, max_tokens_in_batch=config.max_tokens_in_batch or None)


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
    description=STAGES["llm_checkpoint"].description,
)
def llm_checkpoint(context: dg.AssetExecutionContext, config: TrainConfig, store: DataStore,
                   training: TrainingResource, train_launcher: Launcher) -> dg.MaterializeResult:
    """Trains the CosyVoice2/3 LLM on ``train.data.list`` / ``cv.data.list`` (SFT, or DPO) and
    leaves the upstream checkpoint files in this run's own ``<model_dir>/<run id>/``."""
    layout = store.layout
    cv_sha256 = cv_list_sha256(layout.cv_list())  # before training: the list the trainer evaluates on
    options = train_options(config, training, context.run.run_id, layout.train_list(), layout.cv_list())
    invocation = train_launcher.launch(context, [*options.to_argv(), *config.extra_args],
                                       gpus_per_node=config.gpus_per_node, nodes=config.nodes,
                                       rdzv_endpoint=config.rdzv_endpoint)
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
    metadata["run_dir"] = options.model_dir
    metadata["cv_list_sha256"] = cv_sha256
    metadata["engine"] = config.engine.value
    metadata["gpus"] = config.gpus_per_node * config.nodes
    if config.resume_from:
        metadata["resumed_from"] = config.resume_from
    return dg.MaterializeResult(metadata=metadata,
                                check_results=[cv_gate(context.instance, cv_loss, cv_sha256, config.cv_tolerance)])


class AverageConfig(dg.Config):
    num: int = 5
    val_best: bool = True


@dg.asset(deps=[llm_checkpoint], group_name="training", kinds={"pytorch"},
          description=STAGES["llm_averaged"].description)
def llm_averaged(context: dg.AssetExecutionContext, config: AverageConfig, store: DataStore) -> dg.MaterializeResult:
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
    with tempfile.NamedTemporaryFile(suffix=".pt") as local:
        report = average_checkpoints(run_dir, local.name, num=config.num, val_best=config.val_best, allow_fewer=True)
        with open(report.dst_model, "rb") as f:
            data = f.read()
    url = store.layout.llm_model()
    storage.write_bytes(url, data)
    return dg.MaterializeResult(metadata={
        "path": url, "averaged": len(report.sources), "bytes": len(data),
        "llm_checkpoint_run_id": released.run_id, "run_dir": run_dir,
        "sources": dg.MetadataValue.json([os.path.basename(p) for p in report.sources]),
        "cv_losses": dg.MetadataValue.json(report.losses),
    })

