"""The trained models: ``llm_checkpoint``, ``flow_checkpoint``, ``hift_checkpoint`` (the trainer,
launched through Dagster Pipes) and their averages ``llm_averaged``, ``flow_averaged``, ``hift_averaged``.

One factory (:func:`training_assets`) makes the pair of each model in :data:`MODELS`, so the three
differ only where the models do (:class:`TrainedModel`). The asset decides *what* is trained: the
trainer's :class:`~cosyvoice.train.options.TrainOptions` (``--model llm|flow|hifigan``, the run
config's choices on the ``training`` resource's recipe, tokenizer and run dir). The deployment's
``train_launcher`` resource decides *how*: ``torchrun ... cosyvoice-pipeline train`` on this machine
(embedded) or in GPU pods on Kubernetes, one pod per node (distributed; see ``pipelines/launchers.py``).
Rank 0 of the trainer streams one Pipes message per logged step (loss, lr, grad norm, tokens/s or
frames/s, MFU), which become the loss-curve plot, and reports the final metadata. The acoustic
checkpoints also show what they make of one CV utterance (:mod:`cosyvoice.checkpoint_preview`): a
checkpoint that does not load strictly into the runtime's module fails the asset.

Every run writes into its own ``<model root>/<run id>/`` (recorded as ``run_dir``). Each model's
blocking CV gate compares with *its own* released checkpoint, the newest materialization of the same
asset whose gate passed, and only on the same ``cv.data.list`` (``cv_list_sha256``); the averaged
asset averages that run's dir only and writes ``<data root>/<model>/<model>.pt``.
"""

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass

import dagster as dg
from pydantic import Field

from assets._metadata import line_plot, png_markdown
from assets.features import TOKEN_VERSION
from assets.shards import training_data_lists
from cosyvoice import storage
from cosyvoice.checkpoint_preview import ACOUSTIC_MODELS, CheckpointPreview, checkpoint_preview, load_trained
from cosyvoice.model_family import ModelFamily
from cosyvoice.stages import STAGES
from cosyvoice.train.checkpoint import average_checkpoints
from cosyvoice.train.options import BatchType, TrainEngine, TrainOptions
from pipelines.launchers import Launcher
from pipelines.resources import DataStore, TrainingResource, project_path

TRAIN_CHECK = "cv_loss_finite_and_not_worse"
LLM_CHECKPOINT = dg.AssetKey("llm_checkpoint")
SPEECH_TOKENS = dg.AssetKey("speech_tokens")


class TrainConfig(dg.Config):
    """Run configuration of one training run of any model (Launchpad / schedule / CLI ``--config``).
    Where the processes run is the deployment's ``train_launcher`` resource; what the trainer reads
    and where it writes is the ``training`` resource. :class:`LlmTrainConfig` adds the LLM's own."""

    engine: TrainEngine = Field(default=TrainEngine.torch_ddp, description="torch_ddp or deepspeed "
                                "(DeepSpeed uses the training resource's deepspeed_config)")
    gpus_per_node: int = Field(default=1, description="trainer processes per node (torchrun --nproc_per_node)")
    nodes: int = Field(default=1, description="nodes; > 1: torchrun's static rendezvous, this node is rank 0")
    rdzv_endpoint: str = Field(default="", description="host:port of node 0 for nodes > 1 with the subprocess "
                               "launcher (the Kubernetes launcher makes its own)")
    max_epoch: int | None = Field(default=None, description="epochs (default: the recipe's)")
    max_steps: int | None = Field(default=None, description="stop (with a checkpoint and a CV pass) after this many "
                                  "optimizer steps (default: no limit)")
    resume_from: str = Field(default="", description="a checkpoint .pt of an earlier run's dir (exact resume with its "
                             ".state.pt), or released weights to fine-tune from (weights only)")
    use_amp: bool = Field(default=True, description="bf16 autocast")
    batch_type: BatchType | None = Field(default=None, description="override the recipe's batch type "
                                         "(token: token-budget packed batches, LLM only); empty: the recipe's")
    num_workers: int = Field(default=2, description="DataLoader workers per trainer process")
    extra_args: list[str] = Field(default=[], description="further `cosyvoice-pipeline train` flags, appended as is")
    cv_tolerance: float = Field(default=0.0, description="allowed relative CV-loss increase over the last "
                                "released checkpoint")


class LlmTrainConfig(TrainConfig):
    """The LLM's run configuration: :class:`TrainConfig` plus DPO and token-budget batches."""

    dpo: bool = Field(default=False, description="DPO instead of SFT")
    ref_model: str = Field(default="", description="DPO reference model .pt (loaded strictly)")
    max_tokens_in_batch: int | None = Field(default=None, description="real LLM tokens per batch for batch_type token")


@dataclass(frozen=True)
class TrainedModel:
    """What differs between the trained models on the Dagster side. ``name``: the asset prefix, the
    run-dir root (:meth:`TrainingResource.model_root`) and the averaged file
    (:meth:`~cosyvoice.layout.DataLayout.model_file`); ``throughput``: the key of the trainer's step
    messages. The acoustic models (flow, HiFT) get a CV-utterance preview and strict-load checks."""

    name: str
    title: str
    throughput: str
    config: type[TrainConfig]

    @property
    def acoustic(self) -> bool:
        return self.name in ACOUSTIC_MODELS

    @property
    def checkpoint_key(self) -> dg.AssetKey:
        return dg.AssetKey(f"{self.name}_checkpoint")

    @property
    def averaged_key(self) -> dg.AssetKey:
        return dg.AssetKey(f"{self.name}_averaged")


LLM = TrainedModel("llm", "LLM", "tokens_per_s", LlmTrainConfig)
FLOW = TrainedModel("flow", "flow", "frames_per_s", TrainConfig)
HIFT = TrainedModel("hift", "HiFT", "frames_per_s", TrainConfig)
#: every trained model, in graph order
MODELS = (LLM, FLOW, HIFT)


def train_options(config: TrainConfig, training: TrainingResource, run_id: str, train_list: str,
                  cv_list: str, model: str = "llm") -> TrainOptions:
    """The trainer's options for run ``run_id`` of ``model``: the run config's choices on top of the
    training resource's recipe, tokenizer and the model's run dir (:meth:`TrainingResource.options`).
    DPO is LLM-only (preference pairs of speech-token sequences): refused for the acoustic models."""
    llm_only = {}
    if isinstance(config, LlmTrainConfig):
        if model != "llm" and (config.dpo or config.ref_model or config.max_tokens_in_batch):
            raise ValueError(f"dpo, ref_model and max_tokens_in_batch are LLM-only; the {model} model trains by SFT "
                             "on frame-budget batches")
        llm_only = dict(dpo=config.dpo, ref_model=(config.ref_model or None) if config.dpo else None,
                        max_tokens_in_batch=config.max_tokens_in_batch or None)
    if model != "llm" and config.batch_type is BatchType.token:
        raise ValueError(f"batch_type token counts LLM tokens; the {model} model batches by frames (dynamic) or "
                         "by count (static)")
    return training.options(run_id, train_list, cv_list, model=model, train_engine=config.engine,
                            use_amp=config.use_amp, num_workers=config.num_workers, prefetch=8,
                            max_epoch=config.max_epoch, max_steps=config.max_steps,
                            checkpoint=config.resume_from or None, batch_type=config.batch_type, **llm_only)


def cv_list_sha256(url: str) -> str:
    """Fingerprint of the CV set: the sha256 of ``cv.data.list``'s bytes. CV losses are compared only
    between runs with the same fingerprint."""
    return hashlib.sha256(storage.read_bytes(url)).hexdigest()


@dataclass(frozen=True)
class ReleasedCheckpoint:
    """The last materialization of a ``*_checkpoint`` asset whose CV gate passed: the baseline of
    that asset's next gate and the checkpoints its ``*_averaged`` asset averages."""

    run_id: str
    run_dir: str | None  # None: materialized before training outputs were run-scoped
    cv_loss: float | None
    cv_list_sha256: str | None
    recipe: str | None = None  # the recipe it was trained with (None: not recorded)
    family: str | None = None  # the recipe's model generation, cosyvoice.model_family (None: not recorded)


def released_checkpoint(instance: dg.DagsterInstance, asset_key: dg.AssetKey = LLM_CHECKPOINT
                        ) -> ReleasedCheckpoint | None:
    """The newest materialization of ``asset_key`` whose ``cv_loss_finite_and_not_worse`` evaluation
    passed (a rejected run is never a baseline and never averaged); None if none has."""
    check_key = dg.AssetCheckKey(asset_key, TRAIN_CHECK)
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
                dg.AssetRecordsFilter(asset_key=asset_key, storage_ids=[target.storage_id]), limit=1).records
            if not found:
                raise dg.Failure(f"the {asset_key.to_user_string()} materialization {target.storage_id} (run "
                                 f"{target.run_id}) that passed {TRAIN_CHECK} is no longer in the event log")
            meta = {k: v.value for k, v in found[0].asset_materialization.metadata.items()}
            loss = meta.get("cv_loss")
            return ReleasedCheckpoint(run_id=target.run_id, run_dir=meta.get("run_dir"),
                                      cv_loss=float(loss) if loss is not None else None,
                                      cv_list_sha256=meta.get("cv_list_sha256"), recipe=meta.get("recipe"),
                                      family=meta.get("model_family"))
        if len(records) < 50:
            return None
        cursor = records[-1].id


def cv_gate(instance: dg.DagsterInstance, cv_loss: float | None, cv_sha256: str, tolerance: float = 0.0,
            asset_key: dg.AssetKey = LLM_CHECKPOINT, family: str | None = None) -> dg.AssetCheckResult:
    """``cv_loss_finite_and_not_worse``: the CV loss is finite and at most ``(1 + tolerance)`` times
    that of ``asset_key``'s released checkpoint (:func:`released_checkpoint`), compared only when both
    were measured on the same CV list (same ``cv_list_sha256``) with a recipe of the same model
    ``family`` (a CosyVoice1 loss over 4097 classes says nothing about a CosyVoice2 one). No released
    checkpoint, a changed CV list or family: no baseline; the check passes on a finite loss and says
    why nothing was compared."""
    finite = cv_loss is not None and math.isfinite(cv_loss)
    baseline = released_checkpoint(instance, asset_key)
    family_changed = baseline is not None and None not in (baseline.family, family) and baseline.family != family
    reset = baseline is not None and (baseline.cv_list_sha256 != cv_sha256 or family_changed)
    compared = baseline is not None and baseline.cv_loss is not None and not reset
    if baseline is None:
        why = "no released checkpoint yet: this run sets the first baseline"
    elif family_changed:
        why = (f"the recipe's model family changed since the released checkpoint of run {baseline.run_id} "
               f"({baseline.family} -> {family}): baseline reset, CV losses of different model families are not "
               "compared")
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
        check_name=TRAIN_CHECK, asset_key=asset_key, passed=passed, description=f"{verdict}; {why}",
        metadata={"cv_loss": cv_loss if finite else float("nan"),
                  "baseline_cv_loss": baseline.cv_loss if compared else float("nan"),
                  "baseline_run_id": baseline.run_id if baseline is not None else "",
                  "baseline_reset": reset,
                  "cv_list_sha256": cv_sha256})


def progress_metadata(model: TrainedModel, messages: list) -> dict:
    """The loss curves (every ``loss*`` value of the TRAIN messages, the CV loss) and the last
    step's throughput and MFU, from the trainer's Pipes messages."""
    steps = [m for m in messages if isinstance(m, dict) and m.get("tag") == "TRAIN"]
    cvs = [m for m in messages if isinstance(m, dict) and m.get("tag") == "CV"]
    if not steps:
        return {}
    losses = sorted({k for m in steps for k, v in m.items() if k.startswith("loss") and isinstance(v, (int, float))})
    series = {f"train {k}": ([m["step"] for m in steps if k in m], [m[k] for m in steps if k in m]) for k in losses}
    series["cv loss"] = ([m["step"] for m in cvs], [m["loss"] for m in cvs])
    metadata = {"loss_curve": line_plot(series, title=f"{model.title} loss", xlabel="optimizer step"),
                f"last_{model.throughput}": float(steps[-1].get(model.throughput, 0.0))}
    if steps[-1].get("mfu") is not None:
        metadata["last_mfu"] = float(steps[-1]["mfu"])
    return metadata


def preview_metadata(model: TrainedModel, checkpoint: str | None, recipe: str, cv_list: str) -> dict:
    """``preview`` (the picture, or why there is none) and ``preview_*`` of ``model``'s final
    checkpoint; a checkpoint that does not load strictly fails the asset (``dg.Failure``)."""
    if not checkpoint:
        preview = CheckpointPreview(model.title, "skipped", "the trainer reported no checkpoint")
    else:
        try:
            preview = checkpoint_preview(model.name, project_path(checkpoint), recipe, cv_list)
        except ValueError as exc:
            raise dg.Failure(f"{checkpoint}: the trained {model.title} does not load strictly into the runtime's "
                             f"module (recipe {recipe}): {exc}") from exc
    metadata = preview.as_metadata()
    metadata["preview"] = png_markdown(preview.png, f"{model.title} preview: {preview.utterance}") if preview.png \
        else dg.MetadataValue.md(preview.markdown())
    return metadata


def check_token_version(instance: dg.DagsterInstance, family: ModelFamily, recipe: str) -> None:
    """Refuse to train ``recipe`` on speech tokens of another generation (``dg.Failure`` before any launch):
    the newest ``speech_tokens`` run's token version must be the recipe's. After a recipe switch (v2 -> v1) the
    shards still hold the old tokens until ``speech_tokens`` and ``parquet_shards`` are backfilled again;
    v1 codes (< 4096) would even pass a v2 LLM's vocabulary silently. Nothing recorded: nothing to compare."""
    event = instance.get_latest_materialization_event(SPEECH_TOKENS)
    recorded = event.asset_materialization.metadata.get(TOKEN_VERSION) if event is not None else None
    version = getattr(recorded, "value", recorded)
    if version is not None and version != family.tokenizer_version:
        raise dg.Failure(f"{recipe} trains {family.name} on {family.tokenizer_version} speech tokens "
                         f"({family.speech_tokenizer}), but the newest speech_tokens run (run {event.run_id}) "
                         f"extracted {version} tokens: backfill speech_tokens and parquet_shards (and "
                         "training_data_lists) with this recipe first", allow_retries=False)


def train_and_gate(context: dg.AssetExecutionContext, model: TrainedModel, config: TrainConfig, store: DataStore,
                   training: TrainingResource, train_launcher: Launcher) -> dg.MaterializeResult:
    """Train ``model`` on ``train.data.list`` / ``cv.data.list`` into this run's own dir and judge
    the result with the model's CV gate."""
    layout = store.layout
    family = training.family()  # the generation the recipe trains: the gate compares only within it
    if model.name != "hift":  # the LLM and the flow read the speech tokens
        check_token_version(context.instance, family, training.recipe)
    cv_sha256 = cv_list_sha256(layout.cv_list())  # before training: the list the trainer evaluates on
    options = train_options(config, training, context.run.run_id, layout.train_list(), layout.cv_list(), model.name)
    invocation = train_launcher.launch(context, [*options.to_argv(), *config.extra_args],
                                       gpus_per_node=config.gpus_per_node, nodes=config.nodes,
                                       rdzv_endpoint=config.rdzv_endpoint)
    metadata = dict(invocation.get_materialize_result().metadata or {})
    reported = {k: getattr(v, "value", v) for k, v in metadata.items()}
    cv_loss = float(reported["cv_loss"]) if reported.get("cv_loss") is not None else None
    metadata.update(progress_metadata(model, invocation.get_custom_messages()))
    if model.acoustic:
        metadata.update(preview_metadata(model, reported.get("checkpoint"), training.recipe_path(), layout.cv_list()))
    metadata.update(run_dir=options.model_dir, recipe=options.config, model_family=family.name,
                    cv_list_sha256=cv_sha256, engine=config.engine.value, gpus=config.gpus_per_node * config.nodes)
    if config.resume_from:
        metadata["resumed_from"] = config.resume_from
    return dg.MaterializeResult(metadata=metadata, check_results=[
        cv_gate(context.instance, cv_loss, cv_sha256, config.cv_tolerance, model.checkpoint_key, family.name)])


class AverageConfig(dg.Config):
    num: int = 5
    val_best: bool = True


def average_released(context: dg.AssetExecutionContext, model: TrainedModel, config: AverageConfig,
                     store: DataStore) -> dg.MaterializeResult:
    """``<data root>/<model>/<model>.pt``: the average of the best (lowest CV loss) checkpoints of
    the released run of ``model``'s checkpoint asset (:func:`released_checkpoint`: the newest one
    whose CV gate passed), read from that run's own directory only; a plain state dict in the
    released layout (upstream ``average_model.py``). The metadata names the file (``path``,
    ``sha256``) and the recipe that sizes it (``recipe``), which ``triton_model_repo`` serves."""
    asset = model.checkpoint_key.to_user_string()
    released = released_checkpoint(context.instance, model.checkpoint_key)
    if released is None:
        raise dg.Failure(f"no {asset} materialization has passed {TRAIN_CHECK}: nothing to average")
    if not released.run_dir:
        raise dg.Failure(f"the released {asset} (run {released.run_id}) records no run_dir: it predates "
                         f"run-scoped training outputs; materialize {asset} again")
    latest = context.instance.get_latest_materialization_event(model.checkpoint_key)
    if latest is not None and latest.run_id != released.run_id:
        context.log.warning("the latest %s (run %s) did not pass %s; averaging the released run %s",
                            asset, latest.run_id, TRAIN_CHECK, released.run_id)
    run_dir = released.run_dir
    if not os.path.isdir(run_dir):
        raise dg.Failure(f"{run_dir}: the run dir of the released {asset} (run {released.run_id}) does not exist")
    with tempfile.NamedTemporaryFile(suffix=".pt") as local:
        report = average_checkpoints(run_dir, local.name, num=config.num, val_best=config.val_best, allow_fewer=True)
        if model.acoustic:
            check_loads_strictly(context, model, report.dst_model, released.recipe)
        with open(report.dst_model, "rb") as f:
            data = f.read()
    url = store.layout.model_file(model.name)
    storage.write_bytes(url, data)
    return dg.MaterializeResult(metadata={
        "path": url, "sha256": hashlib.sha256(data).hexdigest(), "averaged": len(report.sources), "bytes": len(data),
        f"{asset}_run_id": released.run_id, "run_dir": run_dir, "recipe": released.recipe or "",
        "sources": dg.MetadataValue.json([os.path.basename(p) for p in report.sources]),
        "cv_losses": dg.MetadataValue.json(report.losses),
    })


def check_loads_strictly(context: dg.AssetExecutionContext, model: TrainedModel, path: str, recipe: str | None) -> None:
    """The averaged acoustic file loads strictly into the runtime's module with the sizes of the
    recipe the run trained with (``dg.Failure`` otherwise): what ``Token2Wav`` will load."""
    if not recipe:
        context.log.warning(f"the released {model.checkpoint_key.to_user_string()} records no recipe: the averaged "
                            f"{model.title} was not load-checked")
        return
    try:
        load_trained(model.name, path, recipe)
    except ValueError as exc:
        raise dg.Failure(f"the averaged {model.title} does not load strictly with the sizes of {recipe}: {exc}") from exc


def training_assets(model: TrainedModel) -> tuple[dg.AssetsDefinition, dg.AssetsDefinition]:
    """``<model>_checkpoint`` (train + CV gate, GPU pool) and ``<model>_averaged``, group ``training``."""
    checkpoint_name, averaged_name = model.checkpoint_key.to_user_string(), model.averaged_key.to_user_string()

    @dg.asset(
        name=checkpoint_name, deps=[training_data_lists], group_name="training", kinds={"pytorch"}, pool="gpu",
        check_specs=[dg.AssetCheckSpec(TRAIN_CHECK, asset=checkpoint_name, blocking=True,
                                       description=f"CV loss finite and not worse than the last released {model.title} "
                                                   "checkpoint measured on the same cv.data.list")],
        description=STAGES[checkpoint_name].description,
    )
    def checkpoint(context: dg.AssetExecutionContext, config: model.config, store: DataStore,
                   training: TrainingResource, train_launcher: Launcher) -> dg.MaterializeResult:
        return train_and_gate(context, model, config, store, training, train_launcher)

    @dg.asset(name=averaged_name, deps=[checkpoint], group_name="training", kinds={"pytorch"},
              description=STAGES[averaged_name].description)
    def averaged(context: dg.AssetExecutionContext, config: AverageConfig, store: DataStore) -> dg.MaterializeResult:
        return average_released(context, model, config, store)

    return checkpoint, averaged


llm_checkpoint, llm_averaged = training_assets(LLM)
flow_checkpoint, flow_averaged = training_assets(FLOW)
hift_checkpoint, hift_averaged = training_assets(HIFT)
#: the assets of this module, in graph order
TRAINING_ASSETS = [llm_checkpoint, llm_averaged, flow_checkpoint, flow_averaged, hift_checkpoint, hift_averaged]
