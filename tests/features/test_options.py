"""The feature stages' options: typed once (frozen dataclasses with enums), validated where they are
built, and the same object from the CLI flags as from Python."""

import dataclasses

import pytest

from cosyvoice.cli import build_parser
from cosyvoice.features.options import (
    Device,
    EmbeddingOptions,
    LongAudio,
    Precision,
    Runtime,
    SpeechTokenOptions,
    options_from,
)


def test_an_unknown_value_names_the_allowed_ones():
    with pytest.raises(ValueError, match="device must be one of cpu, cuda; got 'tpu'"):
        SpeechTokenOptions(device="tpu")
    with pytest.raises(ValueError, match="long_audio must be one of skip, chunk; got 'cut'"):
        SpeechTokenOptions(long_audio="cut")


def test_strings_become_the_enum_members():
    options = SpeechTokenOptions(device="cuda", long_audio="chunk", runtime="torch", precision="bf16")
    assert (options.device, options.long_audio, options.runtime, options.precision) == (
        Device.cuda, LongAudio.chunk, Runtime.torch, Precision.bf16)


@pytest.mark.parametrize("values,message", [
    ({"precision": "bf16"}, "needs runtime='torch'"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"num_workers": -1}, "num_workers must be >= 0"),
])
def test_inconsistent_options_are_refused_when_built(values, message):
    with pytest.raises(ValueError, match=message):
        SpeechTokenOptions(**values)


def test_options_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EmbeddingOptions().num_workers = 3


def test_the_cli_flags_parse_into_the_same_options_object():
    args = build_parser().parse_args([
        "extract-speech-token", "--dir", "d", "--onnx_path", "m.onnx", "--num_thread", "3", "--device", "cuda",
        "--long_audio", "chunk", "--batch_size", "8", "--runtime", "torch", "--precision", "bf16",
        "--agreement_sample", "5"])
    assert options_from(SpeechTokenOptions, args) == SpeechTokenOptions(
        num_workers=3, device=Device.cuda, long_audio=LongAudio.chunk, batch_size=8, runtime=Runtime.torch,
        precision=Precision.bf16, agreement_sample=5)
    args = build_parser().parse_args(["extract-embedding", "--dir", "d", "--onnx_path", "m.onnx", "--num_thread", "2"])
    assert options_from(EmbeddingOptions, args) == EmbeddingOptions(num_workers=2)


def test_the_cli_refuses_a_value_outside_the_enum(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["extract-speech-token", "--dir", "d", "--onnx_path", "m", "--device", "tpu"])
    assert "invalid Device value: 'tpu'" in capsys.readouterr().err
