"""``triton_model_repo``: the served Triton repository, published as a new verified version.

The recipe picks the generation (``cosyvoice.model_family``). CosyVoice2/3: the LLM is the pipeline's
(``hf_checkpoint``, ``trtllm_engine``); the acoustic weights are the pipeline's ``flow_averaged`` /
``hift_averaged`` or a released model dir's, as the run config's ``acoustic_source`` says. CosyVoice1
(CosyVoice-300M, TransformerLM): there is no HF/TensorRT-LLM export, so the repository is the model dir
alone (cosyvoice BLS + python-backend ``transformer_llm`` + 22.05 kHz ``token2wav``, the CPU channel), its
``llm.pt`` the pipeline's ``llm_averaged`` or the released one by the same ``acoustic_source`` rule. The
metadata records which files were served (path + sha256).
"""

import tempfile
from enum import Enum

import dagster as dg
from pydantic import Field

from cosyvoice.acoustic import CONFIG_FILE, CONFIG_FILE_V1, FLOW_FILE, HIFT_FILE
from cosyvoice.acoustic.preview import sample_preview
from cosyvoice.corpus.kaldi import read_table
from cosyvoice.model_family import COSYVOICE1, ModelFamily, model_dir_family, recipe_family
from cosyvoice.stages import STAGES
from cosyvoice.triton.model_dir import LLM_FILE, ModelDirReport, check_acoustic_files, compose_model_dir
from cosyvoice.triton.publish import DEFAULT_MOUNT, has_engine, publish_triton_repo
from cosyvoice.triton.spk2info import build_spk2info
from pipelines.resources import DataStore, ModelStore

SERVING_CHECKS = ("schema_valid", "semantics_valid", "server_load_test")
#: the file each averaged acoustic asset provides
ACOUSTIC_ASSETS = {FLOW_FILE: dg.AssetKey("flow_averaged"), HIFT_FILE: dg.AssetKey("hift_averaged")}
#: a CosyVoice1 repository serves the LLM weights themselves (no HF export): the averaged LLM provides them
LLM_ASSETS = {LLM_FILE: dg.AssetKey("llm_averaged")}
#: the repository name (``<data root>/triton/<name>``) when the config leaves it empty: the family's BLS
DEFAULT_NAMES = {COSYVOICE1.name: "cosyvoice"}
DEFAULT_NAME = "cosyvoice2"


class AcousticSource(str, Enum):
    """Where ``flow.pt`` / ``hift.pt`` (and a CosyVoice1 model's ``llm.pt``) come from: ``pipeline`` (the
    newest ``flow_averaged`` and ``hift_averaged`` (+ ``llm_averaged``); all must have been materialized),
    ``released`` (the released model dir), or ``auto`` (each from the pipeline when its averaged asset has
    been materialized, else released)."""

    pipeline = "pipeline"
    released = "released"
    auto = "auto"


class TritonRepoConfig(dg.Config):
    """Where the inputs are and how to serve. Empty paths mean the pipeline's own outputs:
    ``hf_checkpoint``'s ``<data root>/export/hf``, ``trtllm_engine``'s
    ``<data root>/export/engine/<engine_variant>`` and the models resource root. An empty ``name``: the
    model family's (``cosyvoice2``; ``cosyvoice`` for a CosyVoice1 model, so generations never share a
    root). A CosyVoice1 model takes no ``hf_dir``/``engine_dir``/``engine_variant`` and ``llm_backend``
    other than auto/python (its LLM serves on the python backend)."""

    name: str = ""
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


def pipeline_acoustic_files(instance: dg.DagsterInstance, source: AcousticSource,
                            assets: dict[str, dg.AssetKey] = ACOUSTIC_ASSETS) -> dict[str, dict]:
    """``{file: metadata of the newest materialization}`` of the averaged ``assets`` (default: the acoustic
    ones) that ``source`` takes from the pipeline (``path``, ``sha256``, ``recipe``, ``run_id``)."""
    if source is AcousticSource.released:
        return {}
    chosen, missing = {}, []
    for name, key in assets.items():
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


def served_family(chosen: dict[str, dict], released_dir: str) -> ModelFamily | None:
    """The generation to serve: the recipe the pipeline's acoustic files were trained with, else the
    released dir's own recipe (None: neither names one, served as CosyVoice2)."""
    recipes = sorted({meta.get("recipe") for meta in chosen.values() if meta.get("recipe")})
    return recipe_family(recipes[0]) if recipes else model_dir_family(released_dir)


def pipeline_llm_file(context: dg.AssetExecutionContext, source: AcousticSource) -> dict[str, dict]:
    """A CosyVoice1 repository's ``llm.pt`` from ``llm_averaged`` as ``source`` says (as the acoustic
    files). An averaged LLM of another generation is never served: ``pipeline`` fails naming it, ``auto``
    serves the released ``llm.pt`` and says why."""
    chosen = pipeline_acoustic_files(context.instance, source, LLM_ASSETS)
    meta = chosen.get(LLM_FILE)
    if meta is None:
        return {}
    family = recipe_family(meta["recipe"]) if meta.get("recipe") else None
    if family is COSYVOICE1:
        return chosen
    why = (f"llm_averaged (run {meta['run_id']}) was trained with {meta.get('recipe') or 'no recorded recipe'}, "
           f"not a {COSYVOICE1.name} recipe")
    if source is AcousticSource.pipeline:
        raise dg.Failure(f"acoustic_source pipeline: {why}; retrain the LLM with the CosyVoice1 recipe or set "
                         "acoustic_source: released", allow_retries=False)
    context.log.warning(f"{why}: serving the released {LLM_FILE}")
    return {}


def served_model_dir(dest: str, released_dir: str, chosen: dict[str, dict],
                     family: ModelFamily | None = None) -> ModelDirReport:
    """The model dir to serve, composed in ``dest`` (:func:`compose_model_dir`): the released dir
    with the pipeline's files of ``chosen`` and, with them, the recipe they were trained with as
    ``cosyvoice2.yaml`` (``cosyvoice.yaml`` for CosyVoice1); each pipeline file must still be the bytes
    its materialization recorded."""
    replacements = {name: meta["path"] for name, meta in chosen.items()}
    recipes = {meta.get("recipe") for meta in chosen.values()}
    if chosen:
        if len(recipes) != 1 or not next(iter(recipes)):
            raise dg.Failure("the averaged acoustic models name different or no training recipes "
                             f"({sorted(map(str, recipes))}): retrain them with one recipe")
        replacements[CONFIG_FILE_V1 if family is COSYVOICE1 else CONFIG_FILE] = recipes.pop()
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
    deps=[dg.AssetKey("hf_checkpoint"), dg.AssetKey("trtllm_engine"), *ACOUSTIC_ASSETS.values(),
          *LLM_ASSETS.values()],
    group_name="serving", kinds={"triton"},
    check_specs=[dg.AssetCheckSpec(n, asset="triton_model_repo", blocking=True) for n in SERVING_CHECKS],
    description=STAGES["triton_model_repo"].description,
)
def triton_model_repo(context: dg.AssetExecutionContext, config: TritonRepoConfig, store: DataStore,
                      models: ModelStore) -> dg.MaterializeResult:
    """Render + validate + load-test the repository (CosyVoice2: five models; CosyVoice1: cosyvoice +
    transformer_llm + token2wav) and publish it to ``<data root>/triton/<name>/<version>/``; the channel's
    pointer (``LATEST`` for the TensorRT-LLM repository, ``LATEST-cpu`` for the python-backend fallback and
    every CosyVoice1 version) switches only after the upload
    verifies and the load test passed (or ``load_test: skip`` was configured). Nothing is published
    when the repository is invalid or the load test fails. The metadata shows which acoustic files
    were served (``acoustic_files``: source, path, sha256) and ~2 s the published acoustic models
    speak for the default speaker (``sample``: waveform + spectrogram)."""
    released_dir = config.model_dir or models.root
    chosen = pipeline_acoustic_files(context.instance, config.acoustic_source)
    family = served_family(chosen, released_dir)
    if family is COSYVOICE1:
        refuse_llm_export_settings(config, family)
        chosen.update(pipeline_llm_file(context, config.acoustic_source))
    with tempfile.TemporaryDirectory(prefix="served-model-dir-") as work:
        served = served_model_dir(work, released_dir, chosen, family)
        if family is COSYVOICE1:
            require_v1_files(served.path, released_dir)
        context.log.info(f"model files: {served.as_metadata()['acoustic_source'] or 'none'}")
        return _publish(context, config, store, served, family)


#: what a CosyVoice1 repository serves from its model dir (spk2info.pt is built here from the corpus)
V1_SERVED_FILES = (LLM_FILE, FLOW_FILE, HIFT_FILE, CONFIG_FILE_V1, "campplus.onnx", COSYVOICE1.speech_tokenizer)


def require_v1_files(model_dir: str, released_dir: str) -> None:
    """``dg.Failure`` before the prompts are built when the composed CosyVoice1 dir lacks a file its repository
    serves (the LLM, the acoustic models, the recipe, the front-end ONNX models the prompts come from)."""
    from cosyvoice.acoustic.synthesis import missing_files

    absent = missing_files(model_dir, V1_SERVED_FILES)
    if absent:
        raise dg.Failure(f"{released_dir} is a {COSYVOICE1.name} model dir ({CONFIG_FILE_V1}) but the model to serve "
                         f"lacks {', '.join(absent)}: a CosyVoice1 repository serves {', '.join(V1_SERVED_FILES)} "
                         "(make-reference-models --family cosyvoice1 writes stand-ins)", allow_retries=False)


def refuse_llm_export_settings(config: TritonRepoConfig, family: ModelFamily) -> None:
    """``dg.Failure`` before any work when the run config asks a CosyVoice1 model for what only a Qwen2 LLM has
    (an HF export, a TensorRT-LLM engine or backend): silently ignoring them would serve something else."""
    asked = [f"{key}: {value}" for key, value in (("hf_dir", config.hf_dir), ("engine_dir", config.engine_dir))
             if value]
    if config.llm_backend not in ("auto", "python"):
        asked.append(f"llm_backend: {config.llm_backend}")
    if asked:
        raise dg.Failure(f"the model to serve is a {family.name} model and {family.trtllm_unsupported}; the run "
                         f"config sets {', '.join(asked)}: leave them empty/auto", allow_retries=False)


def _publish(context: dg.AssetExecutionContext, config: TritonRepoConfig, store: DataStore,
             served: ModelDirReport, family: ModelFamily | None = None) -> dg.MaterializeResult:
    layout = store.layout
    name = config.name or (DEFAULT_NAMES.get(family.name, DEFAULT_NAME) if family else DEFAULT_NAME)
    model_dir = served.path
    if family is COSYVOICE1:  # the model dir alone: its llm.pt on the python backend, the CPU channel
        hf_dir = engine_dir = ""
        backend = "python"
    else:
        hf_dir = config.hf_dir or layout.export_dir("hf")
        engine_dir = config.engine_dir or layout.export_dir("engine", config.engine_variant)
        backend = config.llm_backend
        if backend == "auto":
            backend = "tensorrtllm" if has_engine(engine_dir) else "python"
            if backend == "python":
                context.log.warning(f"no TensorRT-LLM engine in {engine_dir}: publishing the HF export on the python "
                                    "backend to the CPU channel (LATEST-cpu); the GPU LATEST is left as it is")
    manifest_dir = layout.manifest_dir(config.spk2info_subset)
    speakers = config.spk2info_speakers or sorted(set(read_table(manifest_dir, "utt2spk").values()))[:1]
    spk2info_url = layout.spk2info(name)
    spk = build_spk2info(manifest_dir, model_dir, spk2info_url, speakers=speakers)
    report = publish_triton_repo(layout.triton_root(name), engine_dir=engine_dir, hf_dir=hf_dir,
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
                  "model_family": family.name if family else "cosyvoice2",
                  "pull": f"cosyvoice-pipeline triton-pull --root {layout.triton_root(name)} --dest "
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
