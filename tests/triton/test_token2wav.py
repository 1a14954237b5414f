"""The token2wav python model, in-process with a stand-in ``triton_python_backend_utils``: input
checks (speech-token range, offsets) and the bounds on per-stream caches (finalize, error,
cancellation, idle timeout, live-stream limit) with the echo runtime, whose ``next_offset`` dict is
the per-request cache being bounded and which checks that a stream's chunks are contiguous; the
runtime options the config passes to the factory; and the real ``Token2Wav`` behind the adapter
(offline and streamed audio equal to the library's own for the same seed)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest

from cosyvoice.triton import runtime
from tests.triton.helpers import ORIGINAL_VOCAB_SIZE

MODEL_PY = os.path.join(os.path.dirname(runtime.__file__), "templates", "token2wav", "1", "model.py")
HELPERS = os.path.join(os.path.dirname(__file__), "helpers.py")
ECHO_RUNTIME = HELPERS + ":EchoToken2Wav"
OPTIONS_RUNTIME = HELPERS + ":OptionsEchoToken2Wav"


class _Tensor:
    def __init__(self, name, array):
        self.name, self._array = name, np.asarray(array)

    def as_numpy(self):
        return self._array


class _Error:
    def __init__(self, message):
        self._message = message

    def message(self):
        return self._message


class _Response:
    def __init__(self, output_tensors=None, error=None):
        self.output_tensors, self.error = output_tensors or [], error


class _Request:
    def __init__(self, request_id="", cancelled=False, **inputs):
        self.inputs = {k: _Tensor(k, v) for k, v in inputs.items() if v is not None}
        self._id, self.cancelled = request_id, cancelled

    def request_id(self):
        return self._id

    def is_cancelled(self):
        return self.cancelled


def _pb_utils() -> types.ModuleType:
    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor, pb.InferenceResponse, pb.TritonError = _Tensor, _Response, _Error
    pb.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    pb.logged = []
    pb.Logger = types.SimpleNamespace(log_warn=pb.logged.append, log_info=pb.logged.append)
    return pb


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture()
def make_model(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _pb_utils())
    spec = importlib.util.spec_from_file_location("token2wav_model_under_test", MODEL_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    models = []

    def make(instance=None, **params):
        config = {"parameters": {k: {"string_value": str(v)} for k, v in
                                 {"model_dir": "/nonexistent", "token2wav_runtime": ECHO_RUNTIME, **params}.items()}}
        model = module.TritonPythonModel()
        model.initialize({"model_config": json.dumps(config), **(instance or {})})
        model.streams.clock = _Clock()
        models.append(model)
        return model

    yield make
    for model in models:
        model.finalize()


def _ids(tokens):
    return (np.asarray(tokens, dtype=np.int32) + ORIGINAL_VOCAB_SIZE)[None]


def _chunk(request_id, tokens, offset, finalize, **kw):
    return _Request(request_id, target_speech_tokens=_ids(tokens), token_offset=np.array([offset], dtype=np.int32),
                    finalize=np.array([finalize]), **kw)


def _result(response):
    if response.error is not None:
        return response.error.message()
    return response.output_tensors[0].as_numpy().reshape(-1).tolist()


def test_ids_outside_the_speech_tokens_get_an_error_response_and_the_batch_is_still_served(make_model):
    model = make_model()
    good = _Request("a", target_speech_tokens=_ids([0, 5, 6560]))
    too_high = _Request("b", target_speech_tokens=_ids([1, 6561]))  # <|eos1|>-like id, not a speech token
    text_id = _Request("c", target_speech_tokens=np.array([[100, ORIGINAL_VOCAB_SIZE + 2]], dtype=np.int32))
    bad_prompt = _Request("d", target_speech_tokens=_ids([1]), prompt_speech_tokens=_ids([-1]))
    empty = _Request("e", target_speech_tokens=np.zeros((1, 0), dtype=np.int32))
    results = [_result(r) for r in model.execute([good, too_high, text_id, bad_prompt, empty])]
    assert results[0] == [0.0, 5.0, 6560.0]
    assert "target_speech_tokens: 1 of 2 ids are not speech tokens" in results[1] and "first: 158224" in results[1]
    assert "first: 100 at position 0" in results[2]
    assert results[3].startswith("token2wav: prompt_speech_tokens: 1 of 1 ids")
    assert "target_speech_tokens is empty" in results[4]


def test_bad_streaming_controls_are_request_errors(make_model):
    model = make_model()
    beyond = _chunk("x", [1, 2, 3], 4, False)
    no_finalize = _Request("y", target_speech_tokens=_ids([1, 2]), token_offset=np.array([0], dtype=np.int32))
    no_id = _chunk("", [1, 2, 3, 4], 0, False)
    results = [_result(r) for r in model.execute([beyond, no_finalize, no_id])]
    assert "token_offset 4 outside the 3 target_speech_tokens" in results[0]
    assert "token_offset given without finalize" in results[1]
    assert "needs a request id" in results[2]
    assert len(model.streams) == 0 and model.runtime.next_offset == {}


def test_a_finalized_stream_releases_its_cache(make_model):
    model = make_model()
    tokens = list(range(10))
    assert _result(model.execute([_chunk("s", tokens[:6], 0, False)])[0]) == [0.0, 1.0, 2.0]
    assert "s" in model.streams and model.runtime.next_offset == {"s": 3}
    assert _result(model.execute([_chunk("s", tokens, 3, True)])[0]) == [float(t) for t in range(3, 10)]
    assert len(model.streams) == 0 and model.runtime.next_offset == {}
    assert model.streams.released == {"finalize": 1}


def test_an_error_or_a_cancellation_mid_stream_releases_the_cache(make_model):
    model = make_model()
    model.execute([_chunk("err", list(range(6)), 0, False), _chunk("cxl", list(range(6)), 0, False)])
    assert set(model.runtime.next_offset) == {"err", "cxl"}
    wrong_offset = _chunk("err", list(range(12)), 2, False)  # the runtime rejects it (expects offset 3)
    cancelled = _chunk("cxl", list(range(12)), 3, False, cancelled=True)
    errors = [_result(r) for r in model.execute([wrong_offset, cancelled])]
    assert "expected 3" in errors[0] and "was cancelled" in errors[1]
    assert len(model.streams) == 0 and model.runtime.next_offset == {}
    assert model.streams.released == {"error": 1, "cancelled": 1}
    # a later chunk of a released stream is refused, not served from a fresh cache
    assert "stream is not live" in _result(model.execute([_chunk("err", list(range(12)), 3, False)])[0])


def test_a_client_that_never_finalizes_cannot_grow_the_caches_without_bound(make_model):
    model = make_model(idle_timeout_s=30, max_live_requests=8)
    clock = model.streams.clock
    served = refused = 0
    for i in range(200):  # 200 streams opened, none finalized, one every second
        clock.now += 1.0
        result = _result(model.execute([_chunk(f"leak-{i}", list(range(6)), 0, False)])[0])
        if isinstance(result, str):
            assert "max_live_requests 8" in result
            refused += 1
        else:
            served += 1
        assert len(model.streams) <= 8 and len(model.runtime.next_offset) <= 8
    assert refused > 0 and served > 8  # full streams were refused, idle ones made room again
    assert model.streams.released["idle"] == served - len(model.streams)
    clock.now += 31  # nothing arrives: the sweeper releases what is left
    assert model.streams.sweep() and len(model.streams) == 0 and model.runtime.next_offset == {}
    assert any("never finalized" in line for line in sys.modules["triton_python_backend_utils"].logged)


def test_the_idle_sweeper_runs_without_traffic_and_unload_releases_everything(make_model):
    import time

    model = make_model(idle_timeout_s=0.2)
    model.streams.clock = time.monotonic
    model.execute([_chunk("quiet", list(range(6)), 0, False)])
    deadline = time.monotonic() + 10
    while model.runtime.next_offset and time.monotonic() < deadline:
        time.sleep(0.05)
    assert model.runtime.next_offset == {} and model.streams.released == {"idle": 1}
    other = make_model()
    other.execute([_chunk("open", list(range(6)), 0, False)])
    other.finalize()
    assert other.runtime.next_offset == {} and other.streams.released == {"shutdown": 1}


@pytest.mark.parametrize("params, problem", [({"idle_timeout_s": "0"}, "idle_timeout_s='0'"),
                                             ({"max_live_requests": "many"}, "max_live_requests='many'")])
def test_bad_cache_parameters_fail_the_model_load(make_model, params, problem):
    with pytest.raises(ValueError, match=problem):
        make_model(**params)


def test_unset_cache_parameters_take_the_defaults(make_model):
    model = make_model(idle_timeout_s="${token2wav_idle_timeout_s}")
    assert (model.streams.idle_timeout_s, model.streams.max_live) == (runtime.IDLE_TIMEOUT_S, runtime.MAX_LIVE_REQUESTS)


# --- the acoustic runtime's options ------------------------------------------------------------

def test_runtime_options_reach_the_factory_as_keywords_only_when_set(make_model):
    model = make_model(token2wav_runtime=OPTIONS_RUNTIME, seed="7", stream_cache="False", chunk_causal_final="yes",
                       estimator_dtype="bf16", device="cpu", max_stream_cache_bytes="1048576")
    assert model.runtime.options == {"seed": 7, "stream_cache": False, "chunk_causal_final": True,
                                     "estimator_dtype": "bf16", "device": "cpu", "max_stream_cache_bytes": 1 << 20}
    unset = make_model(token2wav_runtime=OPTIONS_RUNTIME, seed="${token2wav_seed}", device="", stream_cache=" ")
    assert unset.runtime.options == {}
    # a runtime whose factory takes model_dir alone serves as long as no option is set ...
    assert _result(make_model().execute([_Request("a", target_speech_tokens=_ids([4, 2]))])[0]) == [4.0, 2.0]
    # ... and says which parameters to drop when one is
    with pytest.raises(RuntimeError, match=r"parameters seed are options of cosyvoice\.acoustic\.token2wav:Token2Wav"):
        make_model(seed="1")


@pytest.mark.parametrize("params, problem", [
    ({"seed": "-1"}, r"seed='-1': expected an integer from 0"),
    ({"seed": "1.5"}, r"seed='1.5'"),
    ({"stream_cache": "maybe"}, r"stream_cache='maybe': expected true or false"),
    ({"chunk_causal_final": "2"}, r"chunk_causal_final='2'"),
    ({"estimator_dtype": "fp8"}, r"estimator_dtype='fp8': expected one of fp32, bf16, fp16"),
    ({"device": "gpu0"}, r"device='gpu0': expected cpu, cuda or cuda:<index>"),
    ({"max_stream_cache_bytes": "0"}, r"max_stream_cache_bytes='0': expected a positive number of bytes"),
])
def test_bad_runtime_options_fail_the_model_load_naming_the_parameter(make_model, params, problem):
    with pytest.raises(ValueError, match=problem):
        make_model(token2wav_runtime=OPTIONS_RUNTIME, **params)


def test_a_gpu_instance_runs_on_its_own_gpu_and_a_missing_cuda_device_is_a_clear_error(make_model, monkeypatch):
    gpu_instance = {"model_instance_kind": "GPU", "model_instance_device_id": "1"}
    checked = []
    monkeypatch.setattr(runtime, "check_device", checked.append)
    model = make_model(instance=gpu_instance, token2wav_runtime=OPTIONS_RUNTIME)
    assert model.runtime.options == {"device": "cuda:1"} and checked == ["cuda:1"]
    explicit = make_model(instance=gpu_instance, token2wav_runtime=OPTIONS_RUNTIME, device="cpu")
    assert explicit.runtime.options == {"device": "cpu"}
    cpu_instance = make_model(instance={"model_instance_kind": "CPU"}, token2wav_runtime=OPTIONS_RUNTIME)
    assert cpu_instance.runtime.options == {}
    monkeypatch.undo()
    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"device 'cuda:3' asked for, but no CUDA device is visible"):
        runtime.check_device("cuda:3")
    runtime.check_device("cpu")


def test_a_runtime_producing_another_rate_than_the_declared_one_fails_the_load(make_model):
    assert make_model(token2wav_runtime=OPTIONS_RUNTIME, sample_rate="24000").runtime.sample_rate == 24000
    with pytest.raises(RuntimeError, match="produces 16000 Hz but the model declares sample_rate 24000"):
        make_model(token2wav_runtime=HELPERS + ":SixteenKilohertzToken2Wav", sample_rate="24000")


def test_the_real_runtime_behind_the_adapter_gives_the_librarys_audio(make_model, tiny_models):
    """Token2Wav (the default runtime) on the tiny reference models: offline and streamed audio
    through the adapter equal the library's for the same seed; the stream is released when final."""
    from cosyvoice.acoustic.token2wav import Token2Wav

    model = make_model(model_dir=tiny_models, token2wav_runtime="", seed="11", device="cpu")
    assert isinstance(model.runtime, Token2Wav) and model.runtime.seed == 11
    rng = np.random.default_rng(0)
    tokens, prompt = rng.integers(0, 6561, 40), rng.integers(0, 6561, 6)
    feat = rng.normal(size=(12, 80)).astype(np.float16)  # what the BLS sends (FP16)
    embedding = rng.normal(size=192).astype(np.float16)
    prompt_inputs = {"prompt_speech_tokens": _ids(prompt), "prompt_speech_feat": feat[None],
                     "prompt_spk_embedding": embedding[None]}
    offline = model.execute([_Request("off", target_speech_tokens=_ids(tokens), **prompt_inputs)])[0]
    wav = offline.output_tensors[0].as_numpy().reshape(-1)
    library = Token2Wav(tiny_models, seed=11, device="cpu")
    args = (prompt, feat.astype(np.float32), embedding.astype(np.float32))
    np.testing.assert_array_equal(wav, library.synthesize(tokens, *args))
    assert len(wav) == 480 * 2 * len(tokens) and np.isfinite(wav).all() and np.abs(wav).max() <= 0.99
    chunks = [_result(r) for r in (model.execute([_chunk("s", tokens[:18], 0, False, **prompt_inputs)])
                                   + model.execute([_chunk("s", tokens, 15, True, **prompt_inputs)]))]
    assert len(model.streams) == 0 and model.runtime.live_streams == 0
    expected = list(library.stream(tokens, *args, ends=[15]))
    assert [len(c) for c in chunks] == [len(c) for c in expected] == [960 * 15 - 3840, 960 * 25 + 3840]
    for got, want in zip(chunks, expected):
        np.testing.assert_array_equal(np.asarray(got, dtype=np.float32), want)
    # speed: passed to the runtime only when it is not 1 (offline here; streaming is the library's test)
    fast = model.execute([_Request("fast", target_speech_tokens=_ids(tokens), speed=np.array([1.5], np.float32),
                                   **prompt_inputs)])[0]
    np.testing.assert_array_equal(fast.output_tensors[0].as_numpy().reshape(-1),
                                  library.synthesize(tokens, *args, speed=1.5))
    bad = model.execute([_Request("bad", target_speech_tokens=_ids(tokens), speed=np.array([9.0], np.float32))])[0]
    assert "speed must be within 0.25-4.0" in _result(bad)
