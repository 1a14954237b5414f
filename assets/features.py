"""Feature assets, partitioned by shard: ``speaker_embeddings``, ``speech_tokens``; per subset:
``speaker_means`` and ``upstream_feature_files`` (the ``.pt`` files the upstream tools read).

Each asset is a face of the library function the stage table names (``cosyvoice/stages.py``): the
per-shard assets call ``extract_embedding`` / ``extract_speech_token`` with ``shard=`` and write the
shard's parquet table; their run configuration is the stage's options object, field for field."""

import functools

import dagster as dg
from pydantic import Field

from assets._per_shard import (
    BACKFILL,
    RETRY,
    SHARDS_PER_RUN,  # noqa: F401  (re-exported: how many shards a backfill run takes)
    add_shard_metadata,
    budget_field,
    check_result,
    check_specs,
    log_run_totals,
    shard_report,
)
from cosyvoice import storage
from cosyvoice.corpus.shard_plan import ShardKey
from cosyvoice.features.options import (
    Device,
    EmbeddingOptions,
    LongAudio,
    Precision,
    Runtime,
    SpeechTokenOptions,
    help_of,
    options_from,
)
from cosyvoice.features.stages import (
    ShardSource,
    check_embedding_shard,
    check_token_shard,
    export_upstream_features,
    extract_embedding,
    extract_speech_token,
    reduce_speaker_means,
)
from cosyvoice.stages import STAGES
from pipelines.k8s import gpu_op_tags
from pipelines.partitions import SHARDS, SUBSETS
from pipelines.resources import DataStore, ModelStore, TrainingResource
from pipelines.retries import retry_transient_only

GPU_K8S = gpu_op_tags()  # nvidia.com/gpu limit, GPU node selector and tolerations (pipelines/k8s.py)
EMBEDDING_CHECKS = ("dim_192_finite", "all_utterances_present", "failure_budget")
TOKEN_CHECKS = ("codes_in_vocabulary", "token_rate", "all_utterances_present", "failure_budget")
MANIFEST = dg.AssetKey("manifest")
#: the speech_tokens metadata key naming the token version (v1/v2/v3) a run extracted
TOKEN_VERSION = "token_version"


class EmbeddingsConfig(dg.Config):
    """Run configuration of ``speaker_embeddings``: :class:`EmbeddingOptions` plus the failure budget."""

    num_workers: int = Field(default=0, ge=0, description=help_of(EmbeddingOptions, "num_workers"))
    max_failed_fraction: float = budget_field()


class SpeechTokensConfig(dg.Config):
    """Run configuration of ``speech_tokens``: :class:`SpeechTokenOptions` plus the failure budget."""

    num_workers: int = Field(default=0, ge=0, description=help_of(SpeechTokenOptions, "num_workers"))
    device: Device = Field(default=Device.cpu, description=help_of(SpeechTokenOptions, "device"))
    long_audio: LongAudio = Field(default=LongAudio.skip, description=help_of(SpeechTokenOptions, "long_audio"))
    batch_size: int = Field(default=1, ge=1, description=help_of(SpeechTokenOptions, "batch_size"))
    runtime: Runtime = Field(default=Runtime.onnxruntime, description=help_of(SpeechTokenOptions, "runtime"))
    precision: Precision = Field(default=Precision.fp32, description=help_of(SpeechTokenOptions, "precision"))
    agreement_sample: int = Field(default=64, ge=0, description=help_of(SpeechTokenOptions, "agreement_sample"))
    max_failed_fraction: float = budget_field()


def _run_shards(context: dg.AssetExecutionContext, extract, options, check, budget: float, store: DataStore,
                model: str) -> dg.MaterializeResult:
    """``extract`` (the stage's library function) for every shard of the run, each into its own parquet
    table, then the stage's ``check`` of every written shard."""
    layout = store.layout
    stage, per_shard, outcomes = context.asset_key.path[-1], {}, {}
    sources: dict[str, ShardSource] = {}  # one read of wav.scp / shards.json per subset and run
    for shard in context.partition_keys:
        subset = ShardKey.parse(shard).subset
        out = layout.shard_file(stage, shard)
        if subset not in sources:  # (setdefault would build, i.e. read, a new one for every shard)
            sources[subset] = ShardSource(layout.manifest_dir(subset))
        source = sources[subset]
        report = extract(source, model, options, shard=shard, parquet=out)
        for failure in report.failures:
            context.log.warning(str(failure))
        results = check(out, source.plan[shard], max_failed_fraction=budget)
        for name, result in results.items():
            outcomes.setdefault(name, []).append((shard, result))
        per_shard[shard] = {**report.as_metadata(),
                            **shard_report(results["failure_budget"], report.failures_url,
                                           [f"{f.utt}: {f.reason}" for f in report.failures])}
        add_shard_metadata(context, shard, per_shard[shard])
    log_run_totals(context, per_shard, ("utterances", "failed", "quarantined", "audio_hours", "wall_seconds"))
    return dg.MaterializeResult(
        metadata={"model": dg.MetadataValue.path(model)},
        check_results=[check_result(name, rows) for name, rows in outcomes.items()])


def _require_model(url: str, what: str) -> None:
    """A missing model file is a configuration error, said before any shard is read (extraction workers
    that fail to load it would only report a broken process pool)."""
    if not storage.exists(url):
        raise dg.Failure(f"{url}: no such model file ({what}); put it in the models resource's root "
                         "(COSYVOICE_MODEL_ROOT)", allow_retries=False)


def _shard_asset(name: str, checks: tuple[str, ...], **extra) -> dict:
    """Shared decorator arguments of the per-shard feature assets."""
    return dict(partitions_def=SHARDS, deps=[dg.AssetDep(MANIFEST, partition_mapping=dg.AllPartitionMapping())],
                group_name="features", kinds={"onnx"}, backfill_policy=BACKFILL, retry_policy=RETRY,
                check_specs=check_specs(name, checks), description=STAGES[name].description, **extra)


@dg.asset(**_shard_asset("speaker_embeddings", EMBEDDING_CHECKS))
@retry_transient_only
def speaker_embeddings(context: dg.AssetExecutionContext, config: EmbeddingsConfig, store: DataStore,
                       models: ModelStore) -> dg.MaterializeResult:
    """CAM++ embeddings of each shard -> ``speaker_embeddings/<subset>/<shard>.parquet`` (utt, embedding, duration)."""
    _require_model(models.campplus_url(), "the CAM++ speaker-embedding model")
    return _run_shards(context, extract_embedding, options_from(EmbeddingOptions, config), check_embedding_shard,
                       config.max_failed_fraction, store, models.campplus_url())


@dg.asset(**_shard_asset("speech_tokens", TOKEN_CHECKS, pool="gpu", op_tags=GPU_K8S))
@retry_transient_only
def speech_tokens(context: dg.AssetExecutionContext, config: SpeechTokensConfig, store: DataStore,
                  models: ModelStore, training: TrainingResource) -> dg.MaterializeResult:
    """S3 speech tokens of each shard -> ``speech_tokens/<subset>/<shard>.parquet`` (utt, speech_token, duration),
    made by the tokenizer of the training recipe's generation (CosyVoice1: ``speech_tokenizer_v1.onnx``, 50 Hz,
    < 4096; CosyVoice2: v2, 25 Hz, < 6561), which the token checks hold them to."""
    family = training.family()
    try:
        model, version = models.speech_tokenizer_for(family, training.recipe)
    except ValueError as exc:  # a tokenizer of another generation: refused before any shard is read
        raise dg.Failure(str(exc), allow_retries=False) from exc
    _require_model(model, f"the {family.name} recipe {training.recipe} extracts {version} tokens with it")
    context.log.info(f"{training.recipe}: {family.name} recipe -> {version} speech tokens from {model}")
    check = functools.partial(check_token_shard, version=version)
    result = _run_shards(context, extract_speech_token, options_from(SpeechTokenOptions, config), check,
                         config.max_failed_fraction, store, model)
    # what the training assets compare with their recipe before they launch (assets/training.py)
    return dg.MaterializeResult(metadata={**(result.metadata or {}), TOKEN_VERSION: version},
                                check_results=result.check_results)


@dg.asset(
    partitions_def=SUBSETS, deps=[dg.AssetDep(speaker_embeddings, partition_mapping=dg.AllPartitionMapping())],
    group_name="features", description=STAGES["speaker_means"].description,
    check_specs=[dg.AssetCheckSpec("every_speaker_has_a_vector", asset="speaker_means")],
)
def speaker_means(context: dg.AssetExecutionContext, store: DataStore) -> dg.MaterializeResult:
    """Per-subset speaker vectors (plain mean of the utterance vectors) -> ``speaker_means/<subset>.parquet``."""
    try:
        report = reduce_speaker_means(store.layout, context.partition_key)
    except FileNotFoundError as exc:  # embedding shards still missing: say so, no retry can help
        raise dg.Failure(str(exc)) from exc
    return dg.MaterializeResult(
        metadata={"speakers": len(report.utterances), "utterances": sum(report.utterances.values()),
                  "path": dg.MetadataValue.path(report.url)},
        check_results=[dg.AssetCheckResult(check_name="every_speaker_has_a_vector", passed=not report.without_vector,
                                           metadata={"missing": dg.MetadataValue.json(report.without_vector[:20])})])


@dg.asset(
    partitions_def=SUBSETS,
    deps=[dg.AssetDep(speech_tokens, partition_mapping=dg.AllPartitionMapping()), speaker_means],
    group_name="features", description=STAGES["upstream_feature_files"].description,
)
def upstream_feature_files(context: dg.AssetExecutionContext, store: DataStore) -> dg.MaterializeResult:
    """``utt2embedding.pt`` / ``spk2embedding.pt`` / ``utt2speech_token.pt`` in the subset's manifest dir, for
    users of the upstream tools (``make_parquet_list.py``, ``train.py``)."""
    written = export_upstream_features(store.layout, context.partition_key)
    return dg.MaterializeResult(metadata={
        **written, "path": dg.MetadataValue.path(store.layout.manifest_dir(context.partition_key))})
