"""Export for serving: ``hf_checkpoint`` -> ``trtllm_checkpoint`` (variants) -> ``trtllm_engine``.

``trtllm_engine`` needs ``trtllm-build``, which only exists in the TensorRT-LLM container on an
NVIDIA GPU; the deployment's ``engine_builder`` resource decides where it runs (distributed: the pod
of ``k8s/trtllm-engine-job.yaml`` through Dagster Pipes; embedded: this machine, which fails at once
naming the image, see ``pipelines/launchers.py``). The embedded deployment leaves it out of
:func:`default_selection`, see ``ENGINE_EXCLUDED_REASON``.
"""

import tempfile

import dagster as dg

from cosyvoice.export.hf import export_hf
from cosyvoice.export.trtllm import CONTAINER_IMAGE
from cosyvoice.export.variants import convert_variants, variant_name, variant_options
from cosyvoice.model_family import recipe_family
from cosyvoice.stages import STAGES
from pipelines.launchers import EngineBuilder
from pipelines.resources import DataStore, TrainingResource, project_path

VERIFY_CHECK = "reference_forward_verified"
ENGINE_EXCLUDED_REASON = (
    "trtllm_engine is not in the embedded deployment's default selection: trtllm-build runs only inside the "
    f"TensorRT-LLM container ({CONTAINER_IMAGE}) on an NVIDIA GPU. Set COSYVOICE_DEPLOYMENT=distributed to build it "
    "as a Kubernetes pod, or run k8s/trtllm-engine-job.yaml.")


class HfExportConfig(dg.Config):
    """``recipe``: the training recipe (its Qwen2 body config), "" = the training resource's.
    ``tokenizer_dir``: CosyVoice-BlankEN, "" = the training resource's ``qwen_pretrain_path`` or an
    equivalent built from the bundled Qwen2 BPE files. ``dtype``: auto keeps llm.pt's."""

    recipe: str = ""
    tokenizer_dir: str = ""
    dtype: str = "auto"


@dg.asset(deps=[dg.AssetKey("llm_averaged")], group_name="export", kinds={"pytorch"}, output_required=False,
          description=f"{STAGES['hf_checkpoint'].description}\n\nSkipped (with the TensorRT-LLM assets after it) for a "
                      "CosyVoice1 recipe: its TransformerLM is no Qwen2 model.")
def hf_checkpoint(context: dg.AssetExecutionContext, config: HfExportConfig, store: DataStore,
                  training: TrainingResource):
    """``<data root>/export/hf``: the averaged LLM as an HF ``Qwen2ForCausalLM`` with speech tokens. A
    recipe whose LLM is no Qwen2 model (CosyVoice1) is skipped, saying why: nothing is materialized, and
    ``trtllm_checkpoint`` / ``trtllm_engine`` of the same run are skipped with it."""
    recipe = project_path(config.recipe) if config.recipe else training.recipe_path()
    family = recipe_family(recipe) if recipe.endswith((".yaml", ".yml")) else None  # else a Qwen2 config dir
    if family is not None and family.trtllm_unsupported:
        context.log.warning(f"hf_checkpoint skipped for {recipe} ({family.name}): {family.trtllm_unsupported}")
        return
    yield _export_hf(context, config, store, training, recipe)


def _export_hf(context: dg.AssetExecutionContext, config: HfExportConfig, store: DataStore,
               training: TrainingResource, recipe: str) -> dg.MaterializeResult:
    tokenizer_dir = config.tokenizer_dir or training.qwen_dir()
    with tempfile.TemporaryDirectory() as tmp:
        if not tokenizer_dir:
            from cosyvoice.export.tokenizer import blank_en_tokenizer_dir

            tokenizer_dir = blank_en_tokenizer_dir(tmp)
        report = export_hf(store.layout.llm_model(), store.layout.export_dir("hf"), tokenizer_dir=tokenizer_dir,
                           config=recipe, dtype=config.dtype)
    context.log.info(report.summary())
    return dg.MaterializeResult(metadata=report.as_metadata())


class TrtllmCheckpointConfig(dg.Config):
    """One checkpoint per entry of ``variants`` (presets of ``cosyvoice.export.variants.PRESETS``:
    none, int8_weight_only, int4_weight_only, smoothquant[_per_channel][_per_token], int8_kv_cache),
    written to ``export/trtllm/<dtype>_<preset>[_tp<n>]``. Calibration: train.data.list; verification:
    cv.data.list (held out)."""

    variants: list[str] = ["none"]
    dtype: str = "bfloat16"
    tp_size: int = 1
    smoothquant_alpha: float = 0.5
    calib_size: int = 64
    verify_size: int = 16


@dg.asset(deps=[hf_checkpoint, dg.AssetKey("training_data_lists")], group_name="export", kinds={"tensorrt"},
          check_specs=[dg.AssetCheckSpec(VERIFY_CHECK, asset="trtllm_checkpoint",
                                         description="the reference forward of every written variant reproduces the "
                                                     "HF model's logits within the variant's error bound")],
          description=STAGES["trtllm_checkpoint"].description)
def trtllm_checkpoint(context: dg.AssetExecutionContext, config: TrtllmCheckpointConfig,
                      store: DataStore) -> dg.MaterializeResult:
    """TensorRT-LLM checkpoints (config.json + rank*.safetensors) of ``hf_checkpoint``."""
    variants = {variant_name(p, config.dtype, config.tp_size): variant_options(
        p, dtype=config.dtype, smoothquant_alpha=config.smoothquant_alpha, tp_size=config.tp_size) for p in config.variants}
    layout = store.layout
    report = convert_variants(layout.export_dir("hf"), layout.export_dir("trtllm"), variants,
                              calib_data=layout.train_list(), verify_data=layout.cv_list(),
                              calib_size=config.calib_size, verify_size=config.verify_size)
    context.log.info(report.summary())
    per_variant = {r.name: r.as_metadata() for r in report.results}
    metadata = {"variants": dg.MetadataValue.json(per_variant), "calibration": dg.MetadataValue.json(report.calibration)}
    for r in report.results:
        metadata[f"{r.name}/bytes"] = r.convert.bytes
        metadata[f"{r.name}/relative_logit_error"] = r.verify.relative_error
        metadata[f"{r.name}/argmax_agreement"] = r.verify.argmax_agreement
    failed = [r.verify.summary() for r in report.results if not r.verify.passed]
    return dg.MaterializeResult(metadata=metadata, check_results=[dg.AssetCheckResult(
        check_name=VERIFY_CHECK, passed=report.passed, metadata={"variants": dg.MetadataValue.json(per_variant)},
        description="; ".join(failed) or None)])


class EngineConfig(dg.Config):
    """Which checkpoint variant to build and ``trtllm-build``'s flags (CosyVoice run.sh defaults). Where
    it runs and from which images is the deployment's ``engine_builder`` resource."""

    variant: str = "bfloat16_none"
    max_batch_size: int = 16
    max_num_tokens: int = 32768
    gemm_plugin: str = "bfloat16"


@dg.asset(deps=[trtllm_checkpoint], group_name="export", kinds={"tensorrt", "kubernetes"}, pool="gpu",
          description=f"{STAGES['trtllm_engine'].description}\n\n{ENGINE_EXCLUDED_REASON}")
def trtllm_engine(context: dg.AssetExecutionContext, config: EngineConfig, store: DataStore,
                  engine_builder: EngineBuilder) -> dg.MaterializeResult:
    """``export/engine/<variant>``: config.json + rank*.engine (the Triton ``gpt_model_path``)."""
    return engine_builder.build(context, store.layout.export_dir("trtllm", config.variant),
                                store.layout.export_dir("engine", config.variant), max_batch_size=config.max_batch_size,
                                max_num_tokens=config.max_num_tokens, gemm_plugin=config.gemm_plugin)


EXPORT_ASSETS = [hf_checkpoint, trtllm_checkpoint, trtllm_engine]


def default_selection(deployment_name: str) -> dg.AssetSelection:
    """What "materialize the export stage" means in a deployment (embedded: without the engine)."""
    selection = dg.AssetSelection.assets(hf_checkpoint, trtllm_checkpoint)
    if deployment_name == "distributed":
        selection = selection | dg.AssetSelection.assets(trtllm_engine)
    return selection
