"""The feature stages' options: typed once (frozen dataclasses with enums), validated where they are
built, and the same object from the CLI flags as from Python."""

import dataclasses

import pytest

from cosyvoice.cli import build_parser
from cosyvoice.features import options as feature_options


def test_an_unknown_value_names_the_allowed_ones():
    with pytest.raises(ValueError, match="device must be one of cpu, cuda; got 'tpu'"):
        feature_options.SpeechTokenOptions(device="tpu")
    with pytest.raises(ValueError, match="long_audio must be one of skip, chunk; got 'cut'"):
        feature_options.SpeechTokenOptions(long_audio="cut")


def test_strings_become_the_enum_members():
    options = feature_options.SpeechTokenOptions(device="cuda", long_audio="chunk", runtime="torch", precision="bf16")
    assert (options.device, options.long_audio, options.runtime, options.precision) == (
        feature_options.Device.cuda, feature_options.LongAudio.chunk, feature_options.Runtime.torch, feature_options.Precision.bf16)


@pytest.mark.parametrize("values,message", [
    ({"precision": "bf16"}, "needs runtime='torch'"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"num_workers": -1}, "num_workers must be >= 0"),
])
def test_inconsistent_options_are_refused_when_built(values, message):
    with pytest.raises(ValueError, match=message):
        feature_options.SpeechTokenOptions(**values)


def test_options_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        feature_options.EmbeddingOptions().num_workers = 3


def test_the_cli_flags_parse_into_the_same_options_object():
    args = build_parser().parse_args([
        "extract-speech-token", "--dir", "d", "--onnx_path", "m.onnx", "--num_thread", "3", "--device", "cuda",
        "--long_audio", "chunk", "--batch_size", "8", "--runtime", "torch", "--precision", "bf16",
        "--agreement_sample", "5"])
    assert feature_options.options_from(feature_options.SpeechTokenOptions, args) == feature_options.SpeechTokenOptions(
        num_workers=3, device=feature_options.Device.cuda, long_audio=feature_options.LongAudio.chunk, batch_size=8, runtime=feature_options.Runtime.torch,
        precision=feature_options.Precision.bf16, agreement_sample=5)
    args = build_parser().parse_args(["extract-embedding", "--dir", "d", "--onnx_path", "m.onnx", "--num_thread", "2"])
    assert feature_options.options_from(feature_options.EmbeddingOptions, args) == feature_options.EmbeddingOptions(num_workers=2)


def test_the_cli_refuses_a_value_outside_the_enum(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["extract-speech-token", "--dir", "d", "--onnx_path", "m", "--device", "tpu"])
    assert "invalid Device value: 'tpu'" in capsys.readouterr().err
