"""Export for serving: ``hf_checkpoint`` -> ``trtllm_checkpoint`` (variants) -> ``trtllm_engine``.

``trtllm_engine`` needs ``trtllm-build``, which only exists in the TensorRT-LLM container on an
NVIDIA GPU. Distributed deployment: it runs as a Kubernetes pod through Dagster Pipes (the pod spec of
``k8s/trtllm-engine-job.yaml``). Embedded deployment: it is not part of :func:`default_selection`
(materializing it by hand fails at once, naming the image), see ``ENGINE_EXCLUDED_REASON``.
"""

import copy
import os
import tempfile

import dagster as dg
import yaml

from cosyvoice.export.engine import build_engine
from cosyvoice.export.hf import export_hf
from cosyvoice.export.trtllm import CONTAINER_IMAGE
from cosyvoice.export.variants import convert_variants, variant_name, variant_options
from pipelines.k8s import literal_env
from pipelines.resources import PROJECT_ROOT, DataStore, deployment

VERIFY_CHECK = "reference_forward_verified"
ENGINE_JOB_MANIFEST = PROJECT_ROOT / "k8s" / "trtllm-engine-job.yaml"
ENGINE_EXCLUDED_REASON = (
    "trtllm_engine is not in the embedded deployment's default selection: trtllm-build runs only inside the "
    f"TensorRT-LLM container ({CONTAINER_IMAGE}) on an NVIDIA GPU. Set COSYVOICE_DEPLOYMENT=distributed to build it "
    "as a Kubernetes pod, or run k8s/trtllm-engine-job.yaml.")
#: forwarded into the engine pod as literal values; the credentials come from the job template's Secret (envFrom)
_FORWARDED_ENV = ("COSYVOICE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")


class HfExportConfig(dg.Config):
    """``recipe``: the training recipe (its Qwen2 body config), "" = $COSYVOICE_TRAIN_RECIPE or
    configs/cosyvoice2.yaml. ``tokenizer_dir``: CosyVoice-BlankEN, "" = $COSYVOICE_QWEN_PRETRAIN_PATH or
    an equivalent built from the bundled Qwen2 BPE files. ``dtype``: auto keeps llm.pt's."""

    recipe: str = ""
    tokenizer_dir: str = ""
    dtype: str = "auto"


def _recipe(config: HfExportConfig) -> str:
    path = config.recipe or os.environ.get("COSYVOICE_TRAIN_RECIPE", "configs/cosyvoice2.yaml")
    return path if "://" in path or os.path.isabs(path) else str(PROJECT_ROOT / path)


@dg.asset(deps=[dg.AssetKey("llm_averaged")], group_name="export", kinds={"pytorch"})
def hf_checkpoint(context: dg.AssetExecutionContext, config: HfExportConfig, store: DataStore) -> dg.MaterializeResult:
    """``<data root>/export/hf``: the averaged LLM as an HF ``Qwen2ForCausalLM`` with speech tokens."""
    tokenizer_dir = config.tokenizer_dir or os.environ.get("COSYVOICE_QWEN_PRETRAIN_PATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        if not tokenizer_dir:
            from cosyvoice.export.tokenizer import blank_en_tokenizer_dir

            tokenizer_dir = blank_en_tokenizer_dir(tmp)
        report = export_hf(store.url("llm", "llm.pt"), store.url("export", "hf"), tokenizer_dir=tokenizer_dir,
                           config=_recipe(config), dtype=config.dtype)
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
                                                     "HF model's logits within the variant's error bound")])
def trtllm_checkpoint(context: dg.AssetExecutionContext, config: TrtllmCheckpointConfig,
                      store: DataStore) -> dg.MaterializeResult:
    """TensorRT-LLM checkpoints (config.json + rank*.safetensors) of ``hf_checkpoint``."""
    variants = {variant_name(p, config.dtype, config.tp_size): variant_options(
        p, dtype=config.dtype, smoothquant_alpha=config.smoothquant_alpha, tp_size=config.tp_size) for p in config.variants}
    report = convert_variants(store.url("export", "hf"), store.url("export", "trtllm"), variants,
                              calib_data=store.url("train.data.list"), verify_data=store.url("cv.data.list"),
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
    variant: str = "bfloat16_none"
    max_batch_size: int = 16
    max_num_tokens: int = 32768
    gemm_plugin: str = "bfloat16"
    trtllm_image: str = CONTAINER_IMAGE
    pipeline_image: str = "cosyvoice-pipeline:latest"
    namespace: str = ""


def engine_pod_spec(config: EngineConfig, checkpoint_url: str) -> dict:
    """``base_pod_spec`` for ``PipesK8sClient``: the pod template of ``k8s/trtllm-engine-job.yaml`` with
    this run's checkpoint, build flags and images; the publishing container is the Pipes one."""
    with open(ENGINE_JOB_MANIFEST) as f:
        spec = copy.deepcopy(yaml.safe_load(f)["spec"]["template"]["spec"])
    forwarded = literal_env({k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ})
    fetch, build = spec["initContainers"]
    fetch["image"] = config.pipeline_image
    fetch["env"] = [{"name": "CHECKPOINT_URL", "value": checkpoint_url}, *forwarded]
    build["image"] = config.trtllm_image
    build["command"] = ["trtllm-build", "--checkpoint_dir", "/work/checkpoint", "--output_dir", "/work/engine",
                        "--max_batch_size", str(config.max_batch_size), "--max_num_tokens", str(config.max_num_tokens),
                        "--gemm_plugin", config.gemm_plugin]
    publish = spec["containers"][0]
    publish["name"] = "dagster-pipes-execution"
    publish.pop("command", None)
    publish["env"] = forwarded
    return spec


@dg.asset(deps=[trtllm_checkpoint], group_name="export", kinds={"tensorrt", "kubernetes"}, pool="gpu",
          description="TensorRT-LLM engine (trtllm-build) of one checkpoint variant. " + ENGINE_EXCLUDED_REASON)
def trtllm_engine(context: dg.AssetExecutionContext, config: EngineConfig, store: DataStore) -> dg.MaterializeResult:
    """``export/engine/<variant>``: config.json + rank*.engine (the Triton ``gpt_model_path``)."""
    checkpoint, out = store.url("export", "trtllm", config.variant), store.url("export", "engine", config.variant)
    if deployment() == "distributed":
        from dagster_k8s import PipesK8sClient

        invocation = PipesK8sClient().run(
            context=context, image=config.pipeline_image, namespace=config.namespace or None,
            command=["python", "-m", "cosyvoice.export.transfer", "put", "/work/engine", out, "--pipes"],
            base_pod_spec=engine_pod_spec(config, checkpoint))
        return invocation.get_materialize_result()
    report = build_engine(checkpoint, out, max_batch_size=config.max_batch_size, max_num_tokens=config.max_num_tokens,
                          gemm_plugin=config.gemm_plugin)
    return dg.MaterializeResult(metadata=report.as_metadata())


EXPORT_ASSETS = [hf_checkpoint, trtllm_checkpoint, trtllm_engine]


def default_selection(deployment_name: str | None = None) -> dg.AssetSelection:
    """What "materialize the export stage" means in a deployment (embedded: without the engine)."""
    selection = dg.AssetSelection.assets(hf_checkpoint, trtllm_checkpoint)
    if (deployment_name or deployment()) == "distributed":
        selection = selection | dg.AssetSelection.assets(trtllm_engine)
    return selection
