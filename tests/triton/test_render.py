"""Rendering, upstream fill-template semantics and validation of the model repository (no server)."""

from __future__ import annotations

import os
import re
import shutil
import threading

import pytest

from cosyvoice.cli import main
from cosyvoice.triton import render, runtime, validate
from cosyvoice.triton.render import MODELS, RenderError, fill_template, render_repo, repo_values

CONTRACT_VARIABLES = {  # contract 12.12
    "triton_max_batch_size", "max_queue_delay_microseconds", "decoupled_mode", "bls_instance_num", "model_dir",
    "llm_tokenizer_dir", "engine_dir", "triton_backend", "max_beam_width", "batching_strategy",
    "max_tokens_in_paged_kv_cache", "max_attention_window_size", "kv_cache_free_gpu_mem_fraction",
    "exclude_input_in_output", "enable_kv_cache_reuse", "encoder_input_features_data_type", "logits_datatype",
    "max_queue_size",
}
#: upstream's tensorrt_llm parameter keys, frozen (test data): FunAudioLLM/CosyVoice ace7c47f
#: runtime/triton_trtllm/model_repo/tensorrt_llm/config.pbtxt, in file order (enable_trt_overlap is
#: commented out there); tensorrtllm_backend c2e65b8 all_models/.../tensorrt_llm adds num_nodes
UPSTREAM_TRTLLM_PARAMETER_KEYS = (
    "max_beam_width", "FORCE_CPU_ONLY_INPUT_TENSORS", "gpt_model_type", "gpt_model_path", "encoder_model_path",
    "max_tokens_in_paged_kv_cache", "max_attention_window_size", "sink_token_length", "batch_scheduler_policy",
    "kv_cache_free_gpu_mem_fraction", "cross_kv_cache_fraction", "kv_cache_host_memory_bytes",
    "kv_cache_onboard_blocks", "exclude_input_in_output", "cancellation_check_period_ms", "stats_check_period_ms",
    "iter_stats_max_iterations", "request_stats_max_iterations", "enable_kv_cache_reuse", "normalize_log_probs",
    "enable_chunked_context", "gpu_device_ids", "participant_ids", "lora_cache_optimal_adapter_size",
    "lora_cache_max_adapter_size", "lora_cache_gpu_memory_fraction", "lora_cache_host_memory_bytes",
    "lora_prefetch_dir", "decoding_mode", "executor_worker_path", "lookahead_window_size", "lookahead_ngram_size",
    "lookahead_verification_set_size", "medusa_choices", "eagle_choices", "gpu_weights_percent",
    "enable_context_fmha_fp32_acc", "multi_block_mode", "cuda_graph_mode", "cuda_graph_cache_size",
    "speculative_decoding_fast_logits", "tokenizer_dir", "guided_decoding_backend", "xgrammar_tokenizer_info_path",
)
TRTLLM_BACKEND_EXTRA_KEYS = ("num_nodes",)
#: the values a rendered tensorrt_llm config carries when only repo_values' defaults are given
SET_BY_DEFAULT = {
    "max_beam_width": "1", "FORCE_CPU_ONLY_INPUT_TENSORS": "no", "gpt_model_type": "inflight_fused_batching",
    "max_tokens_in_paged_kv_cache": "2560", "max_attention_window_size": "2560",
    "kv_cache_free_gpu_mem_fraction": "0.5", "exclude_input_in_output": "True", "enable_kv_cache_reuse": "False",
    "executor_worker_path": "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker"}


@pytest.fixture()
def dirs(tmp_path):
    """A model dir, a tokenizer dir with the CosyVoice2 tokens and an engine dir (config + rank0)."""
    model_dir, hf, engine = tmp_path / "model", tmp_path / "hf", tmp_path / "engine"
    for d in (model_dir, hf, engine):
        d.mkdir()
    (hf / "tokenizer_config.json").write_text('{"added_tokens_decoder": {"158224": {"content": "<|eos1|>"}, '
                                              '"158227": {"content": "<|sos|>"}, "158228": {"content": "<|task_id|>"}}}')
    (engine / "config.json").write_text("{}")
    (engine / "rank0.engine").write_bytes(b"\0" * 16)
    for name in ("campplus.onnx", "speech_tokenizer_v2.onnx"):
        (model_dir / name).write_bytes(b"onnx")
    return {"model_dir": str(model_dir), "hf_dir": str(hf), "engine_dir": str(engine)}


def _config(repo, model):
    with open(os.path.join(repo, model, "config.pbtxt")) as f:
        return validate.parse_config(f.read())


def test_rendered_repo_has_the_upstream_models_tensors_and_decoupling(tmp_path, dirs):
    repo = str(tmp_path / "repo")
    report = render_repo(repo, repo_values(**dirs))
    assert report.models == list(MODELS)
    configs = {m: _config(repo, m) for m in MODELS}
    bls = configs["cosyvoice2"]
    assert [(t.name, t.data_type, list(t.dims), t.optional) for t in bls.input] == [
        ("reference_wav", 11, [-1], True), ("reference_wav_len", 8, [1], True),
        ("reference_text", 13, [1], True), ("target_text", 13, [1], False),
        ("prompt_speech_tokens", 8, [-1], True), ("prompt_speech_feat", 10, [-1, 80], True),
        ("prompt_spk_embedding", 10, [-1], True), ("mode", 13, [1], True), ("speed", 11, [1], True)]
    assert [(t.name, t.data_type) for t in bls.output] == [("waveform", 11)]
    assert bls.model_transaction_policy.decoupled and configs["tensorrt_llm"].model_transaction_policy.decoupled
    assert bls.instance_group[0].count == 4 and bls.max_batch_size == 16
    llm = configs["tensorrt_llm"]
    assert (len(llm.input), len(llm.output)) == (60, 19)
    assert llm.backend == "tensorrtllm" and list(llm.dynamic_batching.preferred_batch_size) == [16]
    unset = {k: f"${{{k}}}" for k in (*UPSTREAM_TRTLLM_PARAMETER_KEYS, *TRTLLM_BACKEND_EXTRA_KEYS)}
    assert {k: v.string_value for k, v in llm.parameters.items()} == {
        **unset, **SET_BY_DEFAULT, "gpt_model_path": dirs["engine_dir"]}
    assert {t.name for t in llm.input if not t.optional} == {"input_lengths", "request_output_len"}
    assert [(t.name, t.data_type) for t in configs["speaker_embedding"].output] == [("prompt_spk_embedding", 10)]
    assert [(t.name, list(t.dims)) for t in configs["token2wav"].input][2] == ("prompt_speech_feat", [-1, 80])
    for model in MODELS:
        assert not configs[model].model_transaction_policy.decoupled or model in ("cosyvoice2", "tensorrt_llm")
        expected = {"model.py"} if model != "tensorrt_llm" else {".gitkeep"}
        assert set(os.listdir(os.path.join(repo, model, "1"))) == expected
    required, optional = render.all_variables()
    assert CONTRACT_VARIABLES <= required | optional
    assert validate.validate_repo(repo).ok


def test_unknown_keys_and_unfilled_variables_are_errors_listing_all_of_them(tmp_path, dirs):
    values = repo_values(**dirs, overrides={"max_batch_sise": "4", "engine_dirr": "x"})
    with pytest.raises(RenderError, match=r"unknown keys: engine_dirr, max_batch_sise"):
        render_repo(str(tmp_path / "a"), values)
    values = repo_values(**dirs)
    del values["decoupled_mode"], values["model_dir"]
    with pytest.raises(RenderError, match=r"unfilled template variables: decoupled_mode, model_dir"):
        render_repo(str(tmp_path / "b"), values)
    with pytest.raises(RenderError, match=r"unfilled template variables: y"):
        render.render_text("max_batch_size: ${y}\n# ${comment_is_fine}\n", {})


def test_optional_parameters_stay_unset_in_tensorrt_llm_and_are_dropped_from_python_models(tmp_path, dirs):
    repo = str(tmp_path / "repo")
    report = render_repo(repo, repo_values(**dirs, overrides={"dynamic_chunk_strategy": "time_based",
                                                             "sink_token_length": "4"}))
    assert {k: v.string_value for k, v in _config(repo, "cosyvoice2").parameters.items()} == {
        "llm_tokenizer_dir": dirs["hf_dir"], "model_dir": dirs["model_dir"], "dynamic_chunk_strategy": "time_based"}
    llm = _config(repo, "tensorrt_llm").parameters
    assert llm["sink_token_length"].string_value == "4"
    # what the backend reads as unset (upstream fill_template leaves exactly this)
    assert llm["lora_prefetch_dir"].string_value == "${lora_prefetch_dir}"
    assert llm["tokenizer_dir"].string_value == "${tokenizer_dir}"
    assert "token2wav_runtime" not in _config(repo, "token2wav").parameters
    assert "token2wav_runtime" in report.dropped_optional["token2wav"]
    assert "sink_token_length" not in report.unset_parameters["tensorrt_llm"]
    assert "tokenizer_dir" in report.unset_parameters["tensorrt_llm"]


def _template_parameter_keys(model):
    """The ``parameters`` keys of a template (it does not parse as a ModelConfig before rendering)."""
    return [re.match(r'\s*parameters:\s*\{\s*key:\s*"([^"]+)"', line).group(1)
            for line in render._code_lines(render._template_text(model)) if line.lstrip().startswith("parameters:")]


def test_tensorrt_llm_template_and_every_rendering_keep_upstreams_full_parameter_key_set(tmp_path, dirs):
    template_keys = _template_parameter_keys("tensorrt_llm")
    assert len(template_keys) == len(set(template_keys))
    assert set(template_keys) == set(UPSTREAM_TRTLLM_PARAMETER_KEYS) | set(TRTLLM_BACKEND_EXTRA_KEYS)
    _, optional = render.template_variables("tensorrt_llm")
    every_optional = {k: "1" for k in optional}
    for n, (values, backend) in enumerate([
            (repo_values(**dirs), "tensorrtllm"),
            (repo_values(**dirs, overrides={"tokenizer_dir": dirs["hf_dir"], "decoding_mode": "top_k"}), "tensorrtllm"),
            (repo_values(**dirs, overrides=every_optional), "tensorrtllm"),
            (repo_values(**{**dirs, "engine_dir": dirs["hf_dir"]}), "python")]):
        repo = str(tmp_path / f"repo{n}")
        render_repo(repo, values, llm_backend=backend)
        rendered = _config(repo, "tensorrt_llm").parameters
        assert set(rendered) == set(template_keys), n
        for key in validate.TRTLLM_NO_FALLBACK_PARAMETERS:
            assert key in rendered, (n, key)
    assert validate.validate_repo(str(tmp_path / "repo0")).ok


def _snapshot(folder):
    out = {}
    for base, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(base, name), "rb") as f:
                out[os.path.relpath(os.path.join(base, name), folder)] = f.read()
    return out


def test_a_render_failing_midway_leaves_the_previous_repository_intact_and_no_leftovers(tmp_path, dirs, monkeypatch):
    repo = str(tmp_path / "serving" / "model_repo")
    render_repo(repo, repo_values(**dirs))
    before = _snapshot(repo)
    real = render.render_text

    def fail_on_token2wav(text, values, *, where, **kw):
        if where.startswith("token2wav/"):
            raise OSError(28, "No space left on device")
        return real(text, values, where=where, **kw)

    monkeypatch.setattr(render, "render_text", fail_on_token2wav)
    with pytest.raises(OSError, match="No space left"):
        render_repo(repo, repo_values(**dirs, max_batch_size=4))
    assert _snapshot(repo) == before
    assert os.listdir(tmp_path / "serving") == ["model_repo"]
    monkeypatch.setattr(render, "render_text", real)
    render_repo(repo, repo_values(**dirs, max_batch_size=4))
    assert _config(repo, "cosyvoice2").max_batch_size == 4 and os.listdir(tmp_path / "serving") == ["model_repo"]


def test_a_killed_renders_staging_folder_is_cleaned_by_the_next_render(tmp_path, dirs):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)  # a pid that has exited
    serving = tmp_path / "serving"
    stale = serving / f".model_repo.render-{dead}-abc"
    (stale / "cosyvoice2").mkdir(parents=True)
    live = serving / f".model_repo.render-{os.getpid()}-xyz"  # a concurrent render of this process
    live.mkdir()
    render_repo(str(serving / "model_repo"), repo_values(**dirs))
    assert sorted(os.listdir(serving)) == sorted([live.name, "model_repo"])


def test_a_reader_never_sees_a_missing_or_partial_config_while_the_repository_is_rerendered(tmp_path, dirs):
    repo = str(tmp_path / "serving" / "model_repo")
    render_repo(repo, repo_values(**dirs, max_batch_size=8))
    config = os.path.join(repo, "tensorrt_llm", "config.pbtxt")
    stop, seen, problems = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            try:
                with open(config) as f:
                    text = f.read()
            except OSError as exc:
                problems.append(repr(exc))
                continue
            if not text.rstrip().endswith("}"):
                problems.append(f"partial config ({len(text)} chars)")
            seen.add(validate.parse_config(text).max_batch_size)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(12):
            render_repo(repo, repo_values(**dirs, max_batch_size=4 if n % 2 else 8))
    finally:
        stop.set()
        thread.join()
    assert problems == []
    assert seen <= {4, 8} and len(seen) == 2  # the reader saw both versions, each whole
    assert os.listdir(tmp_path / "serving") == ["model_repo"]


def test_python_llm_backend_keeps_the_interface_and_ships_the_hf_runner(tmp_path, dirs):
    repo = str(tmp_path / "repo")
    render_repo(repo, repo_values(**{**dirs, "engine_dir": dirs["hf_dir"]}), llm_backend="python")
    llm = _config(repo, "tensorrt_llm")
    assert llm.backend == "python" and (len(llm.input), len(llm.output)) == (60, 19)
    assert os.listdir(os.path.join(repo, "tensorrt_llm", "1")) == ["model.py"]
    assert validate.validate_repo(repo).ok


def test_fill_template_keeps_upstream_semantics(tmp_path):
    text = 'max_batch_size: ${triton_max_batch_size}\nq: ${max_queue_delay_microseconds}\np: "${engine_dir}"\nz: "${left}"\n'
    # upstream splits twice (',' then ':'), so a literal ':' in a value needs a double escape
    out = fill_template(text, r"triton_max_batch_size:16,engine_dir:/a\\:b\,c")
    assert out == 'max_batch_size: 16\nq: 0\np: "/a:b,c"\nz: "${left}"\n'
    with pytest.raises(ValueError, match="is not key:value"):
        fill_template(text, r"engine_dir:/a\:b")
    with pytest.raises(ValueError, match="key 'nope' does not exist"):
        fill_template(text, "nope:1")
    path = tmp_path / "config.pbtxt"
    path.write_text(text)
    assert main(["fill-template", str(path), "triton_max_batch_size:8", "-i"]) == 0
    assert path.read_text().startswith("max_batch_size: 8\nq: 0\n")


def _break(repo, model, old, new):
    path = os.path.join(repo, model, "config.pbtxt")
    with open(path) as f:
        text = f.read()
    assert old in text
    with open(path, "w") as f:
        f.write(text.replace(old, new, 1))


@pytest.mark.parametrize("model, old, new, problem", [
    ("cosyvoice2", "max_batch_size:", "max_batch_sise:", 'has no field named "max_batch_sise"'),
    ("token2wav", "TYPE_FP32", "TYPE_FP33", "TYPE_FP33"),
    ("cosyvoice2", "decoupled: True", "decoupled: ${decoupled_mode}", 'Expected "true" or "false"'),
    ("cosyvoice2", "decoupled: True", "decoupled: False", "decoupled differs"),
    ("audio_tokenizer", 'name: "audio_tokenizer"', 'name: "tokenizer"', "differs from its directory name"),
    ("tensorrt_llm", "inflight_fused_batching", "inflight_fused", "gpt_model_type 'inflight_fused'"),
    ("speaker_embedding", "/model\"", "/missing\"", "does not exist"),
    ("tensorrt_llm", 'name: "output_ids" data_type: TYPE_INT32', 'name: "output_ids" data_type: TYPE_INT64',
     "output 'output_ids' is TYPE_INT64, expected TYPE_INT32"),
    ("cosyvoice2", "count: 4", "count: 0", "instance_group count 0"),
    ("cosyvoice2", 'name: "prompt_speech_feat" data_type: TYPE_FP16', 'name: "prompt_speech_feat" data_type: TYPE_FP32',
     "input 'prompt_speech_feat' is TYPE_FP32, expected TYPE_FP16"),
    ("cosyvoice2", ',\n  { name: "mode" data_type: TYPE_STRING dims: [ 1 ] optional: true }', "",
     "input 'mode' missing (the cosyvoice2 BLS exchanges it)"),
    ("tensorrt_llm", 'parameters: { key: "tokenizer_dir" value: { string_value: "${tokenizer_dir}" } }', "",
     "Cannot find parameter with name: tokenizer_dir"),
    ("tensorrt_llm", 'key: "guided_decoding_backend"', 'key: "guided_decoding"',
     "Cannot find parameter with name: guided_decoding_backend"),
])
def test_validation_catches_schema_and_semantic_errors(tmp_path, dirs, model, old, new, problem):
    repo = str(tmp_path / "repo")
    render_repo(repo, repo_values(**dirs))
    _break(repo, model, old, new)
    report = validate.validate_repo(repo)
    assert not report.ok
    assert any(problem in p for p in report.problems()), report.problems()


def test_validation_needs_an_engine_a_cosyvoice_tokenizer_and_the_model_files(tmp_path, dirs):
    repo = str(tmp_path / "repo")
    render_repo(repo, repo_values(**dirs))
    os.unlink(os.path.join(dirs["engine_dir"], "rank0.engine"))
    with open(os.path.join(dirs["hf_dir"], "tokenizer_config.json"), "w") as f:
        f.write('{"added_tokens_decoder": {"158227": {"content": "<|sos|>"}}}')
    os.unlink(os.path.join(repo, "token2wav", "1", "model.py"))
    os.unlink(os.path.join(dirs["model_dir"], "speech_tokenizer_v2.onnx"))
    with open(os.path.join(dirs["model_dir"], "spk2info.pt"), "wb") as f:
        f.write(b"not a torch file")
    shutil.rmtree(os.path.join(repo, "speaker_embedding"))
    problems = validate.validate_repo(repo).problems()
    assert any("holds no TensorRT-LLM engine" in p for p in problems)
    assert any("lacks <|task_id|>, <|eos1|>" in p for p in problems)
    assert any(p == "token2wav: python backend but 1/model.py is missing" for p in problems)
    assert any("['speaker_embedding'] missing" in p for p in problems)
    assert any("lacks speech_tokenizer_v2.onnx" in p for p in problems)
    assert any(p.startswith("cosyvoice2: spk2info.pt unusable") for p in problems)
    assert len(problems) == 6  # speaker_embedding + engine + tokenizer + model.py + onnx + spk2info
    assert validate.validate_repo(repo).warnings == [
        "token2wav: model_dir lacks the acoustic model files ['flow.pt', 'hift.pt'] that the default runtime "
        "(cosyvoice.acoustic.token2wav:Token2Wav) loads; token2wav will not load until they are there "
        "(make-reference-models writes random-weight ones)"]


def test_acoustic_file_warnings_name_what_our_runtime_loads_not_upstreams_files(tmp_path, dirs):
    repo = str(tmp_path / "repo")
    render_repo(repo, repo_values(**dirs))
    for name in ("flow.pt", "hift.pt"):
        (tmp_path / "model" / name).write_bytes(b"weights")
    warnings = validate.validate_repo(repo).warnings
    assert warnings == ["token2wav: model_dir has no cosyvoice2.yaml (or cosyvoice.yaml); the runtime assumes the released (full-size) "
                        "flow and HiFT settings, so flow.pt/hift.pt of another size will not load"]
    (tmp_path / "model" / "cosyvoice2.yaml").write_text("flow: {}\n")
    # no flow.decoder.estimator.fp32.onnx / CosyVoice-BlankEN: upstream's runtime opens them, ours does not
    assert set(validate.UPSTREAM_ONLY_ACOUSTIC_FILES).isdisjoint(os.listdir(tmp_path / "model"))
    assert validate.validate_repo(repo).warnings == []
    for name in ("flow.pt", "hift.pt", "cosyvoice2.yaml"):
        (tmp_path / "model" / name).unlink()
    custom = repo_values(**dirs, overrides={"token2wav_runtime": "my_tts.runtime:Acoustic"})
    render_repo(repo, custom)  # another runtime decides what it needs
    assert validate.validate_repo(repo).warnings == []


def test_token2wav_runtime_options_are_rendered_when_given_dropped_otherwise_and_validated(tmp_path, dirs):
    repo = str(tmp_path / "repo")
    report = render_repo(repo, repo_values(**dirs))
    base = {"model_dir": dirs["model_dir"], "sample_rate": "24000"}
    assert {k: v.string_value for k, v in _config(repo, "token2wav").parameters.items()} == base
    options = {"token2wav_runtime", "token2wav_idle_timeout_s", "token2wav_max_live_requests", "token2wav_device",
               "token2wav_stream_cache", "token2wav_chunk_causal_final", "token2wav_estimator_dtype",
               "token2wav_seed", "token2wav_max_stream_cache_bytes", "token2wav_compile"}
    assert render.template_variables("token2wav")[1] == options
    assert set(report.dropped_optional["token2wav"]) == options
    given = {"token2wav_seed": "3", "token2wav_stream_cache": "false", "token2wav_chunk_causal_final": "true",
             "token2wav_estimator_dtype": "fp16", "token2wav_device": "cuda:0",
             "token2wav_max_stream_cache_bytes": "1000000", "token2wav_idle_timeout_s": "30"}
    report = render_repo(repo, repo_values(**dirs, overrides=given))
    params = {k: v.string_value for k, v in _config(repo, "token2wav").parameters.items()}
    assert params == {**base, "seed": "3", "stream_cache": "false", "chunk_causal_final": "true",
                      "estimator_dtype": "fp16", "device": "cuda:0", "max_stream_cache_bytes": "1000000",
                      "idle_timeout_s": "30"}
    assert set(report.dropped_optional["token2wav"]) == {"token2wav_runtime", "token2wav_max_live_requests",
                                                         "token2wav_compile"}
    assert runtime.token2wav_options(params) == {"seed": 3, "stream_cache": False, "chunk_causal_final": True,
                                                 "estimator_dtype": "fp16", "device": "cuda:0",
                                                 "max_stream_cache_bytes": 1000000}
    assert validate.validate_repo(repo).ok  # a CUDA device is the serving machine's business, not checked here
    render_repo(repo, repo_values(**dirs, overrides={"token2wav_seed": "x", "token2wav_estimator_dtype": "int8",
                                                     "token2wav_max_live_requests": "0"}))
    _break(repo, "token2wav", 'string_value: "24000"', 'string_value: "22050"')
    problems = validate.validate_repo(repo).problems()
    assert sorted(problems) == [
        "token2wav: parameter estimator_dtype='int8': expected one of fp32, bf16, fp16; "
        "parameter seed='x': expected an integer from 0 to 2**64 - 1",
        "token2wav: parameter max_live_requests='0': expected a positive int",
        "token2wav: parameter sample_rate='22050': the CosyVoice2 acoustic models produce 24000 Hz"]


def test_triton_repo_cli_renders_validates_and_reports(tmp_path, dirs, capsys):
    out = str(tmp_path / "repo")
    args = ["triton-repo", "--engine_dir", dirs["engine_dir"], "--hf_dir", dirs["hf_dir"], "--model_dir",
            dirs["model_dir"], "--out", out, "--no-decoupled", "--max_batch_size", "8", "--bls_instances", "2",
            "--set", "kv_cache_free_gpu_mem_fraction:0.3"]
    assert main(args) == 0
    assert "5 models valid" in capsys.readouterr().out
    assert not _config(out, "cosyvoice2").model_transaction_policy.decoupled
    assert _config(out, "tensorrt_llm").parameters["kv_cache_free_gpu_mem_fraction"].string_value == "0.3"
    assert main(args[:-1] + ["kv_cache_free_gpu_mem_fractio:0.3"]) == 2
    assert "unknown keys: kv_cache_free_gpu_mem_fractio" in capsys.readouterr().err
    assert main(["triton-repo", "--engine_dir", str(tmp_path / "none"), "--hf_dir", dirs["hf_dir"], "--model_dir",
                 dirs["model_dir"], "--out", out]) == 1


def test_chunk_schedule_follows_the_upstream_exponential_hops():
    schedule = runtime.ChunkSchedule("exponential")
    sizes, available = [], 750
    while schedule.ready(available):
        sizes.append(schedule.hop)
        schedule.advance(available)
    assert sizes == [15, 25, 50, 100, 200] and schedule.offset == 390
    assert not runtime.ChunkSchedule().ready(17) and runtime.ChunkSchedule().ready(18)
    with pytest.raises(ValueError, match="exponential or time_based"):
        runtime.ChunkSchedule("linear")


def test_time_based_chunks_grow_only_while_synthesis_runs_ahead_of_real_time(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: clock[0])
    fast, slow = runtime.ChunkSchedule("time_based"), runtime.ChunkSchedule("time_based")
    for schedule, elapsed in ((fast, 0.1), (slow, 2.0)):
        clock[0] = 100.0 + elapsed / 2
        schedule.advance(40)  # first chunk: the hop stays 15
        assert (schedule.offset, schedule.hop) == (15, 15)
        clock[0] = 100.0 + elapsed
        schedule.advance(100)  # 30 tokens = 1.2 s of audio out after `elapsed` seconds
    assert fast.hop == (70 // 15 + 1) * 15  # far ahead of real time: take all that is pending
    assert slow.hop == 15  # behind real time: smallest chunks
