"""Validate a rendered model repository: Triton's own schema first, then our semantic checks.

Schema: every ``config.pbtxt`` must parse into ``inference.ModelConfig`` (the protobuf Triton
loads, shipped as ``tritonclient.grpc.model_config_pb2``). That catches misspelt fields, bad enum
values and placeholders left in numeric/bool positions. It does not catch what the server only
finds at load time or at the first request, so we also check: directory name = model name,
``1/`` (and ``1/model.py`` for python models) present, paths in parameters exist, a valid
``gpt_model_type``, ``decoupled`` the same on ``cosyvoice2`` and ``tensorrt_llm``, sane instance
groups and batching, the tensors the BLS exchanges with each model (name and type), and the
special tokens the BLS looks up in the LLM tokenizer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from cosyvoice.acoustic import CONFIG_FILE, CONFIG_FILE_V1, MODEL_FILES
from cosyvoice.triton.render import MODELS, REFERENCE_AUDIO_MODELS, V1_MODELS

GPT_MODEL_TYPES = ("V1", "v1", "inflight_batching", "inflight_fused_batching")
#: tensors the cosyvoice2 BLS sends/reads, per model: (inputs, outputs) name -> data type
BLS_INTERFACE = {
    "cosyvoice2": ({"reference_wav": "TYPE_FP32", "reference_wav_len": "TYPE_INT32", "reference_text": "TYPE_STRING",
                    "target_text": "TYPE_STRING", "prompt_speech_tokens": "TYPE_INT32",
                    "prompt_speech_feat": "TYPE_FP16", "prompt_spk_embedding": "TYPE_FP16", "mode": "TYPE_STRING",
                    "speed": "TYPE_FP32"},
                   {"waveform": "TYPE_FP32"}),
    "tensorrt_llm": ({"input_ids": "TYPE_INT32", "input_lengths": "TYPE_INT32", "request_output_len": "TYPE_INT32",
                      "end_id": "TYPE_INT32", "pad_id": "TYPE_INT32", "streaming": "TYPE_BOOL",
                      "runtime_top_p": "TYPE_FP32", "runtime_top_k": "TYPE_INT32", "temperature": "TYPE_FP32",
                      "repetition_penalty": "TYPE_FP32", "random_seed": "TYPE_UINT64",
                      "stop_words_list": "TYPE_INT32"},
                     {"output_ids": "TYPE_INT32", "sequence_length": "TYPE_INT32"}),
    "token2wav": ({"target_speech_tokens": "TYPE_INT32", "prompt_speech_tokens": "TYPE_INT32",
                   "prompt_speech_feat": "TYPE_FP16", "prompt_spk_embedding": "TYPE_FP16",
                   "token_offset": "TYPE_INT32", "finalize": "TYPE_BOOL", "speed": "TYPE_FP32"},
                  {"waveform": "TYPE_FP32"}),
    "audio_tokenizer": ({"reference_wav": "TYPE_FP32", "reference_wav_len": "TYPE_INT32"},
                        {"prompt_speech_tokens": "TYPE_INT32"}),
    "speaker_embedding": ({"reference_wav": "TYPE_FP32"}, {"prompt_spk_embedding": "TYPE_FP16"}),
    # a CosyVoice1 repository: the client protocol of cosyvoice2, and the LLM the v1 BLS calls
    "cosyvoice": ({"reference_text": "TYPE_STRING", "target_text": "TYPE_STRING", "prompt_speech_tokens": "TYPE_INT32",
                   "prompt_speech_feat": "TYPE_FP16", "prompt_spk_embedding": "TYPE_FP16", "mode": "TYPE_STRING",
                   "speed": "TYPE_FP32"},
                  {"waveform": "TYPE_FP32"}),
    "transformer_llm": ({"input_ids": "TYPE_INT32", "input_lengths": "TYPE_INT32", "prompt_text_len": "TYPE_INT32",
                         "prompt_speech_tokens": "TYPE_INT32", "speaker_embedding": "TYPE_FP32",
                         "streaming": "TYPE_BOOL", "random_seed": "TYPE_UINT64"},
                        {"output_ids": "TYPE_INT32", "sequence_length": "TYPE_INT32"}),
}
#: what a CosyVoice1 model_dir must hold for the v1 BLS and transformer_llm (the recipe and the LLM weights)
V1_MODEL_DIR_FILES = ("cosyvoice.yaml", "llm.pt")
TOKENIZER_TOKENS = ("<|sos|>", "<|task_id|>", "<|eos1|>")
PATH_PARAMETERS = ("model_dir", "llm_tokenizer_dir", "gpt_model_path")
#: parameters the TensorRT-LLM backend (tensorrtllm_backend ``model_instance_state.cc``) looks up
#: without a fallback: a missing key fails the model load ("Cannot find parameter with name: ...");
#: ``"${key}"`` or ``""`` is how a config leaves them unset
TRTLLM_NO_FALLBACK_PARAMETERS = ("gpt_model_type", "tokenizer_dir", "guided_decoding_backend",
                                 "xgrammar_tokenizer_info_path")
#: files a model opens below its model_dir (contract 13)
MODEL_DIR_FILES = {"speaker_embedding": ("campplus.onnx",), "audio_tokenizer": ("speech_tokenizer_v2.onnx",)}
#: what the default acoustic runtime (``cosyvoice.acoustic.token2wav:Token2Wav``) loads from model_dir
ACOUSTIC_FILES = MODEL_FILES
#: the recipe saying the flow/hift sizes; without it the runtime assumes the released (full-size) ones
ACOUSTIC_CONFIG = CONFIG_FILE
#: opened by upstream's own token2wav runtime only (its TensorRT estimator's ONNX export and the LLM
#: tokenizer folder); ours needs neither, so their absence is not reported
UPSTREAM_ONLY_ACOUSTIC_FILES = ("flow.decoder.estimator.fp32.onnx", "CosyVoice-BlankEN")


@dataclass
class ModelCheck:
    name: str
    schema_ok: bool = False
    errors: list[str] = field(default_factory=list)
    backend: str = ""
    decoupled: bool = False
    max_batch_size: int = 0
    inputs: int = 0
    outputs: int = 0


@dataclass
class ValidationReport:
    repo: str
    models: dict[str, ModelCheck]
    errors: list[str]  # repository-level
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and all(m.schema_ok and not m.errors for m in self.models.values())

    @property
    def schema_ok(self) -> bool:
        return all(m.schema_ok for m in self.models.values())

    def problems(self) -> list[str]:
        return self.errors + [f"{m.name}: {e}" for m in self.models.values() for e in m.errors]

    def as_metadata(self) -> dict:
        return {
            "valid": self.ok,
            "schema_valid": self.schema_ok,
            "problems": self.problems(),
            "warnings": self.warnings,
            "models": {n: {"backend": m.backend, "decoupled": m.decoupled, "max_batch_size": m.max_batch_size,
                           "inputs": m.inputs, "outputs": m.outputs, "schema_ok": m.schema_ok, "errors": m.errors}
                       for n, m in self.models.items()},
        }

    def summary(self) -> str:
        notes = "".join(f"\n  warning: {w}" for w in self.warnings)
        if self.ok:
            return f"{self.repo}: {len(self.models)} models valid ({', '.join(self.models)}){notes}"
        return f"{self.repo}: INVALID\n" + "\n".join(f"  {p}" for p in self.problems()) + notes


def parse_config(text: str):
    """``ModelConfig`` of a config.pbtxt text; raises ``google.protobuf.text_format.ParseError``."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _type_name(data_type: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(data_type)


def _resolve(path: str, base_dir: str, path_map: dict[str, str]) -> str:
    for prefix, local in sorted(path_map.items(), key=lambda kv: -len(kv[0])):
        if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
            return os.path.join(local, os.path.relpath(path, prefix))
    return path if os.path.isabs(path) else os.path.join(base_dir, path)


def _check_model(repo: str, name: str, base_dir: str, path_map: dict[str, str]) -> tuple[ModelCheck, object | None]:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    check = ModelCheck(name)
    folder = os.path.join(repo, name)
    try:
        with open(os.path.join(folder, "config.pbtxt"), encoding="utf-8") as f:
            config = parse_config(f.read())
    except text_format.ParseError as exc:
        check.errors.append(f"config.pbtxt does not parse as inference.ModelConfig: {exc}")
        return check, None
    check.schema_ok = True
    check.backend = config.backend or config.platform
    check.decoupled = config.model_transaction_policy.decoupled
    check.max_batch_size = config.max_batch_size
    check.inputs, check.outputs = len(config.input), len(config.output)
    errors = check.errors
    if config.name != name:
        errors.append(f"model name {config.name!r} differs from its directory name {name!r} (Triton refuses to load it)")
    if not os.path.isdir(os.path.join(folder, "1")):
        errors.append("version directory 1/ is missing")
    if config.backend == "python" and not os.path.isfile(os.path.join(folder, "1", "model.py")):
        errors.append("python backend but 1/model.py is missing")
    if config.backend not in ("python", "tensorrtllm"):
        errors.append(f"backend {config.backend!r}: expected 'python' or 'tensorrtllm'")
    if config.max_batch_size < 0:
        errors.append(f"max_batch_size {config.max_batch_size} < 0")
    for size in config.dynamic_batching.preferred_batch_size:
        if size < 1 or size > max(config.max_batch_size, 1):
            errors.append(f"preferred_batch_size {size} outside 1..max_batch_size ({config.max_batch_size})")
    for tensor in list(config.input) + list(config.output):
        if len(tensor.dims) == 0 and config.max_batch_size == 0:
            errors.append(f"tensor {tensor.name!r} has no dims")
    if not config.instance_group:
        errors.append("no instance_group")
    for group in config.instance_group:
        if group.count < 1:
            errors.append(f"instance_group count {group.count} < 1")
        if config.backend == "tensorrtllm" and group.kind != model_config_pb2.ModelInstanceGroup.KIND_CPU:
            errors.append("the tensorrtllm backend manages its GPUs itself: instance_group kind must be KIND_CPU")
    expected = BLS_INTERFACE.get(name)
    if expected:
        for kind, tensors, declared in (("input", expected[0], config.input), ("output", expected[1], config.output)):
            types = {t.name: _type_name(t.data_type) for t in declared}
            for tensor, dtype in tensors.items():
                if tensor not in types:
                    errors.append(f"{kind} {tensor!r} missing (the cosyvoice2 BLS exchanges it)")
                elif types[tensor] != dtype:
                    errors.append(f"{kind} {tensor!r} is {types[tensor]}, expected {dtype}")
    params = {k: v.string_value for k, v in config.parameters.items()}
    for key in PATH_PARAMETERS:
        if key in params:
            local = _resolve(params[key], base_dir, path_map)
            if not os.path.exists(local):
                errors.append(f"parameter {key}={params[key]!r}: {local} does not exist")
    if name == "tensorrt_llm":
        model_type = params.get("gpt_model_type")
        if config.backend == "tensorrtllm" and model_type not in GPT_MODEL_TYPES:
            errors.append(f"gpt_model_type {model_type!r} is not one of {', '.join(GPT_MODEL_TYPES)}")
        if config.backend == "tensorrtllm":
            for key in TRTLLM_NO_FALLBACK_PARAMETERS:
                if key not in params:
                    errors.append(f"parameter {key} is missing: the tensorrtllm backend looks it up without a "
                                  f"fallback (model load fails with 'Cannot find parameter with name: {key}'); "
                                  f"write \"${{{key}}}\" to leave it unset")
        if "gpt_model_path" not in params:
            errors.append("parameter gpt_model_path (the engine directory) is missing")
        elif config.backend == "tensorrtllm":
            engine = _resolve(params["gpt_model_path"], base_dir, path_map)
            if os.path.isdir(engine) and not (os.path.isfile(os.path.join(engine, "config.json"))
                                              and any(f.startswith("rank") and f.endswith(".engine") for f in os.listdir(engine))):
                errors.append(f"gpt_model_path {params['gpt_model_path']!r} holds no TensorRT-LLM engine "
                              "(config.json + rank<N>.engine from trtllm-build)")
    if name == "token2wav":
        _check_token2wav_parameters(params, errors, _resolve(params.get("model_dir", ""), base_dir, path_map))
    if "llm_tokenizer_dir" in params:
        _check_tokenizer(_resolve(params["llm_tokenizer_dir"], base_dir, path_map), errors)
    return check, config


def _check_token2wav_parameters(params: dict[str, str], errors: list[str], model_dir: str = "") -> None:
    """The values the token2wav model parses at load time (so a bad one fails here, not on the server);
    ``sample_rate`` is the rate of the acoustic models in ``model_dir`` when that folder is here (CosyVoice1
    22050, CosyVoice2/3 24000), else one of those two."""
    from cosyvoice.triton import runtime

    checks = [lambda: runtime.token2wav_options(params),
              lambda: runtime.positive_parameter(params, "idle_timeout_s", runtime.IDLE_TIMEOUT_S),
              lambda: runtime.positive_parameter(params, "max_live_requests", runtime.MAX_LIVE_REQUESTS, cast=int)]
    for check in checks:
        try:
            check()
        except ValueError as exc:
            errors.append(str(exc))
    from cosyvoice.acoustic import runtimes

    rate = params.get("sample_rate")
    if model_dir and os.path.isdir(model_dir):
        generation = runtimes.acoustic_generation(model_dir)
        expected = {str(runtimes.SAMPLE_RATES[generation])}
        what = f"the {'CosyVoice1' if generation == runtimes.V1 else 'CosyVoice2'} acoustic models produce"
    else:
        expected = {str(r) for r in runtimes.SAMPLE_RATES.values()}
        what = "CosyVoice acoustic models produce"
    if rate is not None and rate not in expected:
        errors.append(f"parameter sample_rate={rate!r}: {what} {' or '.join(sorted(expected))} Hz")


def _check_tokenizer(folder: str, errors: list[str]) -> None:
    if not os.path.isdir(folder):
        return
    text = ""
    for fname in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json"):
        path = os.path.join(folder, fname)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                text += f.read()
    missing = [t for t in TOKENIZER_TOKENS if json.dumps(t) not in text]
    if missing:
        errors.append(f"LLM tokenizer {folder} lacks {', '.join(missing)} (not a CosyVoice2 HF export)")


def _acoustic_warnings(params: dict[str, str], folder: str) -> list[str]:
    """What token2wav's default runtime will miss in ``folder``; nothing for another runtime (it
    decides what it needs)."""
    from cosyvoice.triton.runtime import DEFAULT_TOKEN2WAV_RUNTIME

    spec = params.get("token2wav_runtime") or DEFAULT_TOKEN2WAV_RUNTIME
    if spec != DEFAULT_TOKEN2WAV_RUNTIME:
        return []
    absent = [f for f in ACOUSTIC_FILES if not os.path.exists(os.path.join(folder, f))]
    if absent:
        return [f"token2wav: model_dir lacks the acoustic model files {absent} that the default runtime "
                f"({spec}) loads; token2wav will not load until they are there (make-reference-models writes "
                "random-weight ones)"]
    # runtimes.load_token2wav sizes the models by either generation's recipe
    if not any(os.path.isfile(os.path.join(folder, name)) for name in (ACOUSTIC_CONFIG, CONFIG_FILE_V1)):
        return [f"token2wav: model_dir has no {ACOUSTIC_CONFIG} (or {CONFIG_FILE_V1}); the runtime assumes the "
                "released (full-size) flow and HiFT settings, so flow.pt/hift.pt of another size will not load"]
    return []


def validate_repo(repo: str, *, base_dir: str | None = None, path_map: dict[str, str] | None = None,
                  require_reference_models: bool = True) -> ValidationReport:
    """Check every model folder of ``repo``. Relative parameter paths resolve against ``base_dir``
    (default: the current directory, where tritonserver runs); ``path_map`` maps a serving path
    prefix (e.g. ``/models/cosyvoice2``) to the local folder it will be synced from."""
    base_dir = base_dir or os.getcwd()
    path_map = path_map or {}
    present = sorted(d for d in os.listdir(repo) if os.path.isfile(os.path.join(repo, d, "config.pbtxt")))
    checks: dict[str, ModelCheck] = {}
    configs = {}
    for name in present:
        checks[name], configs[name] = _check_model(repo, name, base_dir, path_map)
    errors: list[str] = []
    if "cosyvoice" in present:  # a CosyVoice1 repository (the v1 BLS)
        _check_v1_repo(present, configs, base_dir, path_map, errors)
        return ValidationReport(repo=repo, models=checks, errors=errors, warnings=[])
    extra = sorted(set(present) - set(MODELS))
    if extra:
        errors.append(f"unexpected model folder(s) {extra}; the CosyVoice2 repo holds {list(MODELS)}")
    for name in ("cosyvoice2", "tensorrt_llm", "token2wav"):
        if name not in present:
            errors.append(f"model {name} is missing")
    bls = configs.get("cosyvoice2")
    if bls is not None:
        params = {k: v.string_value for k, v in bls.parameters.items()}
        model_dir = _resolve(params.get("model_dir", ""), base_dir, path_map)
        has_cache = os.path.isfile(os.path.join(model_dir, "spk2info.pt"))
        absent = [m for m in REFERENCE_AUDIO_MODELS if m not in present]
        if absent and require_reference_models:
            errors.append(f"model(s) {absent} missing: requests with reference audio would fail")
        if absent and not has_cache:
            errors.append(f"model(s) {absent} missing and no spk2info.pt in model_dir: only requests that carry "
                          "a cached prompt could be served (no reference audio, no default speaker, no gateway "
                          "speaker registration)")
        strategy = params.get("dynamic_chunk_strategy", "exponential")
        if strategy not in ("exponential", "time_based"):
            errors.append(f"cosyvoice2 dynamic_chunk_strategy {strategy!r}: expected exponential or time_based")
        llm = configs.get("tensorrt_llm")
        if llm is not None and llm.model_transaction_policy.decoupled != bls.model_transaction_policy.decoupled:
            errors.append(f"decoupled differs: cosyvoice2={bls.model_transaction_policy.decoupled}, "
                          f"tensorrt_llm={llm.model_transaction_policy.decoupled} (the BLS streams only when both are)")
    warnings: list[str] = []
    for name, config in configs.items():
        if config is None:
            continue
        params = {k: v.string_value for k, v in config.parameters.items()}
        folder = _resolve(params.get("model_dir", ""), base_dir, path_map)
        if "model_dir" not in params or not os.path.isdir(folder):
            continue
        for fname in MODEL_DIR_FILES.get(name, ()):
            if not os.path.exists(os.path.join(folder, fname)):
                checks[name].errors.append(f"model_dir {params['model_dir']!r} lacks {fname}")
        if name == "cosyvoice2" and os.path.isfile(os.path.join(folder, "spk2info.pt")):
            from cosyvoice.triton.runtime import load_spk2info

            try:
                load_spk2info(os.path.join(folder, "spk2info.pt"))
            except Exception as exc:  # not loadable with weights_only, or no speaker "001"
                checks[name].errors.append(f"spk2info.pt unusable: {exc}")
        if name == "token2wav":
            warnings.extend(_acoustic_warnings(params, folder))
    return ValidationReport(repo=repo, models=checks, errors=errors, warnings=warnings)


def _check_v1_repo(present: list[str], configs: dict, base_dir: str, path_map: dict[str, str],
                   errors: list[str]) -> None:
    """A CosyVoice1 repository holds ``V1_MODELS`` (nothing of the CosyVoice2 set but token2wav), both
    python models stream alike, and the model dir has the v1 recipe and LLM weights."""
    extra = sorted(set(present) - set(V1_MODELS))
    if extra:
        errors.append(f"unexpected model folder(s) {extra} in a CosyVoice1 repo (it holds {list(V1_MODELS)})")
    errors.extend(f"model {name} is missing" for name in V1_MODELS if name not in present)
    bls, llm = configs.get("cosyvoice"), configs.get("transformer_llm")
    if bls is not None and llm is not None and llm.model_transaction_policy.decoupled != bls.model_transaction_policy.decoupled:
        errors.append(f"decoupled differs: cosyvoice={bls.model_transaction_policy.decoupled}, "
                      f"transformer_llm={llm.model_transaction_policy.decoupled} (the BLS streams only when both are)")
    for name in ("cosyvoice", "transformer_llm"):
        config = configs.get(name)
        if config is None:
            continue
        raw = config.parameters["model_dir"].string_value if "model_dir" in config.parameters else ""
        folder = _resolve(raw, base_dir, path_map)
        if os.path.isdir(folder):
            absent = [f for f in V1_MODEL_DIR_FILES if not os.path.isfile(os.path.join(folder, f))]
            if absent:
                errors.append(f"{name}: model_dir {raw!r} lacks {absent} (a CosyVoice1 model dir)")
