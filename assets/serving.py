"""``triton_model_repo``: the served CosyVoice2 Triton repository, published as a new verified version.

Its LLM is the pipeline's (``hf_checkpoint``, ``trtllm_engine``); its acoustic weights are the
pipeline's ``flow_averaged`` / ``hift_averaged`` or a released model dir's, as the run config's
``acoustic_source`` says, and the metadata records which files were served (path + sha256).
"""

import tempfile
from enum import Enum

import dagster as dg
from pydantic import Field

from cosyvoice.acoustic import CONFIG_FILE, FLOW_FILE, HIFT_FILE
from cosyvoice.acoustic.preview import sample_preview
from cosyvoice.corpus.kaldi import read_table
from cosyvoice.model_family import model_dir_family, recipe_family
from cosyvoice.stages import STAGES
from cosyvoice.triton.model_dir import ModelDirReport, check_acoustic_files, compose_model_dir
from cosyvoice.triton.publish import DEFAULT_MOUNT, has_engine, publish_triton_repo
from cosyvoice.triton.spk2info import build_spk2info
from pipelines.resources import DataStore, ModelStore

SERVING_CHECKS = ("schema_valid", "semantics_valid", "server_load_test")
#: the file each averaged acoustic asset provides
ACOUSTIC_ASSETS = {FLOW_FILE: dg.AssetKey("flow_averaged"), HIFT_FILE: dg.AssetKey("hift_averaged")}


class AcousticSource(str, Enum):
    """Where ``flow.pt`` / ``hift.pt`` come from: ``pipeline`` (the newest ``flow_averaged`` and
    ``hift_averaged``; both must have been materialized), ``released`` (the released model dir), or
    ``auto`` (each from the pipeline when its averaged asset has been materialized, else released)."""

    pipeline = "pipeline"
    released = "released"
    auto = "auto"


class TritonRepoConfig(dg.Config):
    """Where the inputs are and how to serve. Empty paths mean the pipeline's own outputs:
    ``hf_checkpoint``'s ``<data root>/export/hf``, ``trtllm_engine``'s
    ``<data root>/export/engine/<engine_variant>`` and the models resource root."""

    name: str = "cosyvoice2"
    hf_dir: str = ""
    engine_dir: str = ""
    engine_variant: str = "bfloat16_none"
    model_dir: str = Field(default="", description="the released model dir: front-end ONNX models, and the acoustic "
                           "weights when they come from there; empty: the models resource root")
    acoustic_source: AcousticSource = Field(default=AcousticSource.auto, description="flow.pt/hift.pt from the "
                                            "pipeline (flow_averaged, hift_averaged), the released model dir, or "
                                            "auto: each from the pipeline once materialized, else released")
    spk2info_subset: str = "dev-clean"
    spk2info_speakers: list[str] = []  # empty: the subset's first speaker becomes "001"
    # tensorrtllm | python (HF on CPU) | auto: tensorrtllm when an engine exists, else python.
    # python versions go to the CPU channel (pointer LATEST-cpu), never to the GPU LATEST.
    llm_backend: str = "auto"
    # auto: run when a tritonserver environment exists here; if it does not, the version is uploaded
    # but not promoted and the server_load_test check fails. require: fail without uploading.
    # skip: publish without a load test, on purpose (the check passes and says so).
    load_test: str = "auto"
    mount: str = DEFAULT_MOUNT
    decoupled: bool = True
    max_batch_size: int = 16
    bls_instances: int = 4


def pipeline_acoustic_files(instance: dg.DagsterInstance, source: AcousticSource) -> dict[str, dict]:
    """``{file: metadata of the newest materialization}`` of the averaged acoustic assets that
    ``source`` takes from the pipeline (``path``, ``sha256``, ``recipe``, ``run_id``)."""
    if source is AcousticSource.released:
        return {}
    chosen, missing = {}, []
    for name, key in ACOUSTIC_ASSETS.items():
        event = instance.get_latest_materialization_event(key)
        if event is None:
            missing.append(key.to_user_string())
            continue
        meta = {k: v.value for k, v in event.asset_materialization.metadata.items()}
        chosen[name] = {**meta, "run_id": event.run_id}
    if missing and source is AcousticSource.pipeline:
        raise dg.Failure(f"acoustic_source pipeline: {', '.join(missing)} never materialized; run the retrain job "
                         "(or materialize them), or set acoustic_source: released")
    return chosen


def refuse_other_generations(chosen: dict[str, dict], released_dir: str) -> None:
    """``dg.Failure`` before any work when what would be served is not a CosyVoice2/3 model: the recipe the
    pipeline's acoustic files were trained with, else the released dir's own recipe, names the family.
    A CosyVoice1 model (TransformerLM, 22.05 kHz) has no HF/TensorRT-LLM LLM and another repository."""
    recipes = sorted({meta.get("recipe") for meta in chosen.values() if meta.get("recipe")})
    family = recipe_family(recipes[0]) if recipes else model_dir_family(released_dir)
    if family is not None and family.trtllm_unsupported:
        source = f"the acoustic models' recipe {recipes[0]}" if recipes else f"the model dir {released_dir}"
        raise dg.Failure(
            f"{source} is a {family.name} model: triton_model_repo publishes the CosyVoice2/3 repository (LLM from "
            f"hf_checkpoint/trtllm_engine), and {family.trtllm_unsupported}. Publish a CosyVoice1 model dir (llm.pt, "
            f"flow.pt, hift.pt, {family.config_file}, campplus.onnx, {family.speech_tokenizer}) with "
            "`cosyvoice-pipeline triton-publish --model_dir ...` (cosyvoice BLS + transformer_llm, cpu channel)",
            allow_retries=False)


def served_model_dir(dest: str, released_dir: str, chosen: dict[str, dict]) -> ModelDirReport:
    """The model dir to serve, composed in ``dest`` (:func:`compose_model_dir`): the released dir
    with the pipeline's files of ``chosen`` and, with them, the recipe they were trained with as
    ``cosyvoice2.yaml``; each pipeline file must still be the bytes its materialization recorded."""
    replacements = {name: meta["path"] for name, meta in chosen.items()}
    recipes = {meta.get("recipe") for meta in chosen.values()}
    if chosen:
        if len(recipes) != 1 or not next(iter(recipes)):
            raise dg.Failure("the averaged acoustic models name different or no training recipes "
                             f"({sorted(map(str, recipes))}): retrain them with one recipe")
        replacements[CONFIG_FILE] = recipes.pop()
    report = compose_model_dir(dest, released_dir, replacements, check=False)
    for name, meta in chosen.items():
        if meta.get("sha256") and report.files[name].sha256 != meta["sha256"]:
            raise dg.Failure(f"{meta['path']} changed since its materialization in run {meta['run_id']} (sha256 "
                             f"{meta['sha256']} -> {report.files[name].sha256}); materialize it again")
    try:
        check_acoustic_files(report)
    except ValueError as exc:
        raise dg.Failure(f"the acoustic models to serve do not fit together: {exc}") from exc
    return report


@dg.asset(
    deps=[dg.AssetKey("hf_checkpoint"), dg.AssetKey("trtllm_engine"), *ACOUSTIC_ASSETS.values()],
    group_name="serving", kinds={"triton"},
    check_specs=[dg.AssetCheckSpec(n, asset="triton_model_repo", blocking=True) for n in SERVING_CHECKS],
    description=STAGES["triton_model_repo"].description,
)
def triton_model_repo(context: dg.AssetExecutionContext, config: TritonRepoConfig, store: DataStore,
                      models: ModelStore) -> dg.MaterializeResult:
    """Render + validate + load-test the five-model repository and publish it to
    ``<data root>/triton/<name>/<version>/``; the channel's pointer (``LATEST`` for the TensorRT-LLM
    repository, ``LATEST-cpu`` for the python-backend fallback) switches only after the upload
    verifies and the load test passed (or ``load_test: skip`` was configured). Nothing is published
    when the repository is invalid or the load test fails. The metadata shows which acoustic files
    were served (``acoustic_files``: source, path, sha256) and ~2 s the published acoustic models
    speak for the default speaker (``sample``: waveform + spectrogram)."""
    chosen = pipeline_acoustic_files(context.instance, config.acoustic_source)
    refuse_other_generations(chosen, config.model_dir or models.root)
    with tempfile.TemporaryDirectory(prefix="served-model-dir-") as work:
        served = served_model_dir(work, config.model_dir or models.root, chosen)
        context.log.info(f"acoustic files: {served.as_metadata()['acoustic_source'] or 'none'}")
        return _publish(context, config, store, served)


def _publish(context: dg.AssetExecutionContext, config: TritonRepoConfig, store: DataStore,
             served: ModelDirReport) -> dg.MaterializeResult:
    layout = store.layout
    hf_dir = config.hf_dir or layout.export_dir("hf")
    engine_dir = config.engine_dir or layout.export_dir("engine", config.engine_variant)
    model_dir = served.path
    backend = config.llm_backend
    if backend == "auto":
        backend = "tensorrtllm" if has_engine(engine_dir) else "python"
        if backend == "python":
            context.log.warning(f"no TensorRT-LLM engine in {engine_dir}: publishing the HF export on the python "
                                "backend to the CPU channel (LATEST-cpu); the GPU LATEST is left as it is")
    manifest_dir = layout.manifest_dir(config.spk2info_subset)
    speakers = config.spk2info_speakers or sorted(set(read_table(manifest_dir, "utt2spk").values()))[:1]
    spk2info_url = layout.spk2info(config.name)
    spk = build_spk2info(manifest_dir, model_dir, spk2info_url, speakers=speakers)
    report = publish_triton_repo(layout.triton_root(config.name), engine_dir=engine_dir, hf_dir=hf_dir,
                                 model_dir=model_dir, spk2info=spk2info_url, mount=config.mount,
                                 load_test=config.load_test, decoupled=config.decoupled,
                                 max_batch_size=config.max_batch_size, bls_instances=config.bls_instances,
                                 llm_backend=backend)
    if not report.promoted:
        context.log.error(report.summary())
    sample = sample_preview(model_dir, spk2info_url, utterance=spk.speakers["001"])
    if sample.status != "rendered":
        context.log.warning(f"no spoken sample of {model_dir}: {sample.reason}")
    validation = report.manifest["validation"]
    load = report.manifest["server_load_test"]
    # a load test that did not run passes only when skipped on purpose ("skipped" means load_test: skip)
    load_ok = load["status"] in ("passed", "skipped")
    channel_flag = "" if report.channel == "gpu" else f" --channel {report.channel}"
    return dg.MaterializeResult(
        metadata={**report.as_metadata(), **served.as_metadata(), "spk2info_speakers": spk.speakers,
                  "model_bytes": report.manifest["model_bytes"],
                  **sample.as_metadata(), "sample": dg.MetadataValue.md(sample.markdown()),
                  "pull": f"cosyvoice-pipeline triton-pull --root {layout.triton_root(config.name)} --dest "
                          f"{config.mount}{channel_flag}"},
        check_results=[
            dg.AssetCheckResult(check_name="schema_valid", passed=bool(validation["schema_valid"])),
            dg.AssetCheckResult(check_name="semantics_valid", passed=bool(validation["valid"]),
                                metadata={"problems": "; ".join(validation["problems"]) or "none"}),
            dg.AssetCheckResult(check_name="server_load_test", passed=load_ok,
                                description=f"load test {load['status']}: {load.get('reason', '')}".rstrip(": "),
                                metadata={**{k: str(v) for k, v in load.items()}, "channel": report.channel,
                                          "promoted": report.promoted, "version": report.version}),
        ],
    )
