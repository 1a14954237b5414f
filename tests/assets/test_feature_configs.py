"""The feature assets' run configuration is the stage's options object, field for field: same
names, types (the enums), defaults and descriptions, so the launchpad validates and documents what
the library takes."""

import typing
from dataclasses import MISSING, fields

import dagster as dg
import pytest

from assets.features import EmbeddingsConfig, SpeechTokensConfig
from cosyvoice.features.options import Device, EmbeddingOptions, Runtime, SpeechTokenOptions, options_from


@pytest.mark.parametrize("config,options", [(EmbeddingsConfig, EmbeddingOptions),
                                            (SpeechTokensConfig, SpeechTokenOptions)])
def test_each_config_field_mirrors_its_option(config, options):
    types = typing.get_type_hints(options)
    model_fields = config.model_fields
    assert set(model_fields) == {f.name for f in fields(options)} | {"max_failed_fraction"}
    for f in fields(options):
        field = model_fields[f.name]
        assert field.annotation is types[f.name], f.name
        assert field.default == (f.default if f.default is not MISSING else f.default_factory()), f.name
        assert field.description == f.metadata["help"], f.name


def test_the_config_turns_into_the_options_unchanged():
    config = SpeechTokensConfig(device="cuda", runtime="torch", batch_size=4, num_workers=2)
    assert options_from(SpeechTokenOptions, config) == SpeechTokenOptions(
        num_workers=2, device=Device.cuda, runtime=Runtime.torch, batch_size=4)


def _validate(run_config: dict):
    from pipelines.definitions import defs

    return dg.validate_run_config(defs.resolve_job_def("features_job"), run_config)


def test_the_launchpad_takes_the_enum_values_and_refuses_others():
    ok = _validate({"ops": {"speech_tokens": {"config": {"device": "cuda", "runtime": "torch", "precision": "bf16"}}}})
    assert ok["ops"]["speech_tokens"]["config"]["device"] == "cuda"
    with pytest.raises(dg.DagsterInvalidConfigError, match="tpu"):
        _validate({"ops": {"speech_tokens": {"config": {"device": "tpu"}}}})
