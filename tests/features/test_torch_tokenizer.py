"""The torch runtime: the s3tokenizer architecture with weights read from the .onnx file, log-mel on
the device, length-sorted masked batches; fp32 must reproduce the upstream tool's tokens exactly."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from cosyvoice.features.feature_files import load_pt
from cosyvoice.features.stages import extract_speech_token
from cosyvoice.features.torch_tokenizer import agreement, build_module, read_weights
from tests.support.upstream import upstream_session, upstream_speech_token

BAD = "9004_1_000000_000001"
LONG = "9003_1_000000_000001"


def wavs(data_dir):
    return dict(line.split(None, 1) for line in open(os.path.join(data_dir, "wav.scp")).read().splitlines())


def expected_tokens(feature_dir, model):
    session = upstream_session(model)
    return {u: upstream_speech_token(p, session) for u, p in wavs(feature_dir).items() if u != BAD}


@pytest.fixture()
def data(feature_dir, tmp_path):
    shutil.copytree(feature_dir, tmp_path / "d")
    return str(tmp_path / "d")


@pytest.mark.parametrize("name", ["speech_tokenizer_v1", "speech_tokenizer_v2", "speech_tokenizer_v2.batch"])
def test_weights_read_from_the_onnx_file_load_strictly_and_give_its_tokens(tiny_models, name):
    import numpy as np
    import onnxruntime as ort

    from cosyvoice.features import frontend

    path = os.path.join(tiny_models, f"{name}.onnx")
    weights = read_weights(path)
    assert weights.version == ("v1" if "v1" in name else "v2")
    module = build_module(weights)  # load_state_dict(strict=True): every parameter found
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    for frames in (1000, 337, 1701):
        mel = frontend.whisper_input(torch.randn(1, frames * 160, generator=generator) * 0.1)
        want = session.run(None, {"feats": mel, "feats_length": np.array([frames], dtype=np.int32)})[0].flatten()
        with torch.inference_mode():
            codes, lengths = module.quantize(torch.from_numpy(mel), torch.tensor([frames]))
        assert codes[0, :int(lengths[0])].tolist() == want.tolist()


def release_style_onnx(state: dict, path: str) -> None:
    """Writes an S3TokenizerV2 state dict the way the released files name things (legacy TorchScript
    exporter: anonymous ``onnx::Conv_*`` / ``onnx::MatMul_*`` initializers, nodes named by module scope
    like ``/blocks.0/attn/query/MatMul``, Linear weights stored transposed). Only the names and the
    node/initializer wiring matter here: the graph is not meant to run."""
    import onnx
    from onnx import helper, numpy_helper

    inits, nodes, counter = [], [], iter(range(3000, 9000))

    def init(name, tensor):
        inits.append(numpy_helper.from_array(tensor.detach().numpy().copy(), name))
        return name

    def node(op, name, *inputs):
        nodes.append(helper.make_node(op, ["x", *inputs], [f"{name}_out"], name=name))

    convs = {"encoder.conv1": ("onnx::Conv_2216", "onnx::Conv_2217"), "encoder.conv2": ("onnx::Conv_2218", "onnx::Conv_2219")}
    for module, (w, b) in convs.items():
        node("Conv", f"/{module.split('.')[1]}/Conv", init(w, state[f"{module}.weight"]), init(b, state[f"{module}.bias"]))
    blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.blocks.")})
    for i in blocks:
        prefix = f"encoder.blocks.{i}"
        for ln in ("attn_ln", "mlp_ln"):
            node("LayerNormalization", f"/blocks.{i}/{ln}/LayerNormalization",
                 init(f"{prefix}.{ln}.w", state[f"{prefix}.{ln}.weight"]), init(f"{prefix}.{ln}.b", state[f"{prefix}.{ln}.bias"]))
        linears = {f"attn.{n}": f"attn/{n}" for n in ("query", "key", "value", "out")}
        linears.update({"mlp.0": "mlp/mlp.0", "mlp.2": "mlp/mlp.2"})
        for module, scope in linears.items():
            node("MatMul", f"/blocks.{i}/{scope}/MatMul", init(f"onnx::MatMul_{next(counter)}", state[f"{prefix}.{module}.weight"].t()))
            if f"{prefix}.{module}.bias" in state:
                node("Add", f"/blocks.{i}/{scope}/Add", init(f"onnx::Add_{next(counter)}", state[f"{prefix}.{module}.bias"]))
        node("Conv", f"/blocks.{i}/attn/fsmn_block/Conv", init(f"onnx::Conv_{next(counter)}", state[f"{prefix}.attn.fsmn_block.weight"]))
    project = "quantizer._codebook.project_down"
    node("MatMul", "/quantizer/project_in/MatMul", init("onnx::MatMul_2536", state[f"{project}.weight"].t()))
    node("Add", "/quantizer/project_in/Add", init("quantizer.project_in.bias", state[f"{project}.bias"]))
    graph = helper.make_graph(nodes, "release_style", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None) for n in nodes],
                              initializer=inits)
    onnx.save(helper.make_model(graph), path)


def test_release_named_files_load_through_the_packages_onnx2torch_mapping(tiny_models, tmp_path):
    """The released files have none of the torch names; their weights must land in the same module."""
    reference = build_module(read_weights(os.path.join(tiny_models, "speech_tokenizer_v2.onnx")))
    path = str(tmp_path / "speech_tokenizer_v2.onnx")
    release_style_onnx(reference.state_dict(), path)
    weights = read_weights(path)
    assert weights.version == "v2"
    loaded = build_module(weights)
    assert loaded.config.n_audio_state == reference.config.n_audio_state == 256
    assert loaded.config.n_audio_layer == reference.config.n_audio_layer
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_file_that_is_not_a_tokenizer_is_refused(tiny_models):
    with pytest.raises(ValueError, match="not an S3 speech tokenizer"):
        read_weights(os.path.join(tiny_models, "campplus.onnx"))


@pytest.mark.parametrize("version,workers,batch", [("v1", 1, 3), ("v2", 2, 3), ("v2", 1, 1)])
def test_torch_runtime_fp32_equals_the_upstream_recipe_exactly(feature_dir, tiny_models, data, version, workers, batch):
    model = os.path.join(tiny_models, f"speech_tokenizer_{version}.onnx")
    report = extract_speech_token(data, model, num_workers=workers, batch_size=batch, runtime="torch")
    assert load_pt(os.path.join(data, "utt2speech_token.pt")) == expected_tokens(feature_dir, model)
    assert report.long_skipped == [LONG] and [(f.utt, f.reason) for f in report.failures] == [(BAD, "undecodable_audio")]
    assert report.as_metadata()["runtime"] == "torch" and report.agreement is None
    assert report.model_seconds > 0


def test_torch_runtime_chunks_long_audio_like_the_onnxruntime_path(feature_dir, tiny_models, data, tmp_path):
    model = os.path.join(tiny_models, "speech_tokenizer_v2.onnx")
    other = tmp_path / "ort"
    shutil.copytree(feature_dir, other)
    extract_speech_token(str(other), model, num_workers=1, long_audio="chunk")
    report = extract_speech_token(data, model, num_workers=1, long_audio="chunk", runtime="torch", batch_size=4)
    assert report.long_chunked == [LONG]
    assert load_pt(os.path.join(data, "utt2speech_token.pt")) == load_pt(str(other / "utt2speech_token.pt"))


def test_bf16_reports_its_agreement_with_fp32_on_a_sample(feature_dir, tiny_models, data):
    model = os.path.join(tiny_models, "speech_tokenizer_v2.onnx")
    report = extract_speech_token(data, model, num_workers=1, batch_size=4, runtime="torch", precision="bf16",
                                  agreement_sample=3)
    reference = expected_tokens(feature_dir, model)
    tokens = load_pt(os.path.join(data, "utt2speech_token.pt"))
    assert sorted(tokens) == sorted(reference)
    assert all(len(tokens[u]) == len(reference[u]) for u in reference)  # lengths come from the masks, not the math
    meta = report.as_metadata()
    assert meta["precision"] == "bf16" and report.agreement_utterances == 3
    assert 0.0 < report.agreement <= 1.0 and meta["bf16_token_agreement"] == round(report.agreement, 5)
    everything = agreement([tokens[u] for u in reference], [reference[u] for u in reference])
    assert everything < 1.0  # bf16 does flip tokens of this model: the report is not a formality


def test_bf16_needs_the_torch_runtime(feature_dir, tiny_models):
    with pytest.raises(ValueError, match="runtime='torch'"):
        extract_speech_token(feature_dir, os.path.join(tiny_models, "speech_tokenizer_v2.onnx"), precision="bf16")


def test_agreement_counts_positions_and_missing_tails():
    assert agreement([[1, 2, 3]], [[1, 2, 3]]) == 1.0
    assert agreement([[1, 9, 3], [4]], [[1, 2, 3], [4, 5]]) == 3 / 5
    assert agreement([], []) == 1.0


def test_cli_bf16_selects_the_torch_runtime_and_prints_the_agreement(tiny_models, data):
    out = subprocess.run([sys.executable, "-m", "cosyvoice.cli", "extract-speech-token", "--dir", data,
                          "--onnx_path", os.path.join(tiny_models, "speech_tokenizer_v2.onnx"), "--num_thread", "1",
                          "--batch_size", "4", "--precision", "bf16", "--agreement_sample", "2"],
                         capture_output=True, text=True, check=True)
    assert "bf16 tokens equal to fp32:" in out.stdout and "sample of 2 utterances" in out.stdout


@pytest.mark.gpu
def test_gpu_torch_runtime_fp32_equals_the_upstream_recipe(feature_dir, tiny_models, data):
    model = os.path.join(tiny_models, "speech_tokenizer_v2.onnx")
    report = extract_speech_token(data, model, num_workers=2, batch_size=8, runtime="torch", device="cuda")
    assert load_pt(os.path.join(data, "utt2speech_token.pt")) == expected_tokens(feature_dir, model)
    assert report.failures[0].utt == BAD


class PickyTokenizer:
    """Stands in for TorchSpeechTokenizer: token i of a window is its length; a window of length 13
    makes the whole batch fail (as a device-memory error would)."""

    precision = "fp32"

    def __init__(self):
        self.batches = []

    def tokens(self, mels, precision=None):
        self.batches.append([m.shape[1] for m in mels])
        if any(m.shape[1] == 13 for m in mels):
            raise RuntimeError("CUDA out of memory")
        return [[m.shape[1]] * 2 for m in mels]

    def release_cached_memory(self):
        pass


def test_a_rejected_batch_is_retried_per_window_and_fails_only_its_utterance():
    from cosyvoice.features.torch_runtime import WindowBatcher, _Pending

    batcher = WindowBatcher(PickyTokenizer(), agreement_sample=0)
    batcher.pending = {"a": _Pending("a.wav", 1.0, 1), "b": _Pending("b.wav", 2.0, 2), "c": _Pending("c.wav", 3.0, 2)}
    mel = lambda n: torch.zeros(128, n)  # noqa: E731
    batcher.run([("a", 0, mel(5)), ("b", 0, mel(7)), ("c", 0, mel(13))])
    batcher.run([("b", 1, mel(9)), ("c", 1, mel(11))])
    rows = {utt: (value, status) for utt, value, _, _, status in batcher.rows}
    assert rows["a"] == ([5, 5], None) and rows["b"] == ([7, 7, 9, 9], "chunked")
    assert rows["c"][0].reason == "model_error" and "out of memory" in rows["c"][0].detail
    assert batcher.pending == {}  # c's second window is not run once its first failed
    assert batcher.tokenizer.batches == [[5, 7, 13], [5], [7], [13], [9]]
