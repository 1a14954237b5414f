"""The tiny CosyVoice1 recipe end to end through Dagster (in-process execution, the real trainer as a Pipes
subprocess): ``COSYVOICE_TRAIN_RECIPE=configs/cosyvoice-tiny.yaml`` alone makes the feature stage extract 50 Hz
v1 tokens, the parquet shards carry them, the LLM trains as a TransformerLM, the flow and HiFT train, are previewed
and averaged as CosyVoice1 modules (22.05 kHz), the HF/TensorRT-LLM export is skipped with its reason, and a v2
tokenizer setting is refused before any work."""

from __future__ import annotations

import os
import sys

import dagster as dg
import pyarrow.parquet as pq
import pytest
import torch

from assets.export import hf_checkpoint, trtllm_checkpoint
from assets.features import speaker_embeddings, speaker_means, speech_tokens
from assets.manifest import manifest
from assets.shards import parquet_shards, training_data_lists
from assets.training import (
    LlmTrainConfig,
    TrainConfig,
    flow_averaged,
    flow_checkpoint,
    hift_averaged,
    hift_checkpoint,
    llm_averaged,
    llm_checkpoint,
)
from cosyvoice.corpus.synthetic import make_synthetic_corpus
from cosyvoice.features.feature_files import read_parquet
from pipelines.launchers import Launcher, SubprocessLauncher
from pipelines.resources import DataStore, ModelStore, TrainingResource, resources_for
from tests.support.v1_recipes import small_gan_recipe

V1_TINY = "configs/cosyvoice-tiny.yaml"
SHARD = "dev-clean-000000"  # the one shard of a 6-utterance corpus: the stages cost per utterance

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def v1_resources(corpus: str, root, models: str, monkeypatch) -> dict:
    """The embedded deployment's resources with only the recipe set, as a user does (COSYVOICE_TRAIN_RECIPE)."""
    monkeypatch.setenv("COSYVOICE_TRAIN_RECIPE", V1_TINY)
    monkeypatch.setenv("COSYVOICE_CORPUS_ROOT", corpus)
    monkeypatch.setenv("COSYVOICE_DATA_ROOT", str(root))
    monkeypatch.setenv("COSYVOICE_MODEL_ROOT", models)
    res = resources_for("embedded")
    res["train_launcher"] = SubprocessLauncher(python=sys.executable)
    return res


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("v1-corpus") / "LibriTTS")
    make_synthetic_corpus(root, subsets=["dev-clean"], speakers=2, utts_per_speaker=3, seed=18)
    return root


@pytest.fixture(scope="module")
def v1_run(small_corpus, tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("v1")
    with pytest.MonkeyPatch.context() as monkeypatch, dg.instance_for_test() as instance:
        res = v1_resources(small_corpus, root, tiny_models, monkeypatch)
        dg.materialize([manifest], partition_key="dev-clean", instance=instance, resources=res)
        features = dg.materialize([speaker_embeddings, speech_tokens], partition_key=SHARD, instance=instance,
                                  resources=res)
        dg.materialize([speaker_means], partition_key="dev-clean", instance=instance, resources=res)
        shards = dg.materialize([parquet_shards], partition_key=SHARD, instance=instance, resources=res)
        dg.materialize([training_data_lists], instance=instance, resources=res, run_config={"ops": {
            "training_data_lists": {"config": {"train_subsets": ["dev-clean"], "cv_subsets": ["dev-clean"]}}}})
        trained = dg.materialize([llm_checkpoint, llm_averaged], instance=instance, resources=res, run_config=dg.RunConfig(
            ops={"llm_checkpoint": LlmTrainConfig(use_amp=False, num_workers=0, max_epoch=1)}))
        exported = dg.materialize([hf_checkpoint, trtllm_checkpoint], instance=instance, resources=res)
        export_logs = [r.user_message for r in instance.all_logs(exported.run_id)]
        monkeypatch.setenv("COSYVOICE_TRAIN_RECIPE", small_gan_recipe(root))
        acoustic_res = {**res, "training": resources_for("embedded")["training"]}
        one_step = TrainConfig(use_amp=False, num_workers=0, max_epoch=1, max_steps=1)
        acoustic = dg.materialize([flow_checkpoint, flow_averaged, hift_checkpoint, hift_averaged], instance=instance,
                                  resources=acoustic_res, run_config=dg.RunConfig(
                                      ops={"flow_checkpoint": one_step, "hift_checkpoint": one_step}))
        yield root, features, shards, (trained, acoustic), (exported, export_logs), (instance, res)


def test_the_v1_recipe_alone_makes_the_token_stage_extract_50hz_v1_tokens(v1_run):
    root, features, shards, *_ = v1_run
    assert features.success and shards.success
    checks = {(e.asset_key.path[-1], e.check_name): e.passed for e in features.get_asset_check_evaluations()}
    assert checks[("speech_tokens", "codes_in_vocabulary")] and checks[("speech_tokens", "token_rate")]
    meta = features.asset_materializations_for_node("speech_tokens")[0].metadata
    assert meta["model"].value.endswith("speech_tokenizer_v1.onnx")
    rows = read_parquet(str(root / "speech_tokens" / "dev-clean" / f"{SHARD}.parquet")).to_pylist()
    assert len(rows) == 6
    codes = [c for r in rows for c in r["speech_token"]]
    assert max(codes) < 4096 and len(set(codes)) > 1
    for r in rows:  # 50 tokens per second (a v2 model would give half as many)
        assert abs(len(r["speech_token"]) - 50 * r["duration"]) <= 2, r["utt"]
    tokens = {r["utt"]: r["speech_token"] for r in rows}
    shard = pq.read_table(str(root / "parquet" / "dev-clean" / "parquet_000000000.tar"),
                          columns=["utt", "speech_token"]).to_pylist()
    assert len(shard) == 6 and all(list(r["speech_token"]) == tokens[r["utt"]] for r in shard)


def test_the_v1_recipe_trains_a_transformer_lm_and_skips_the_qwen2_export(v1_run):
    root, _, _, (trained, _), (exported, export_logs), _ = v1_run
    assert trained.success
    meta = trained.asset_materializations_for_node("llm_checkpoint")[0].metadata
    assert meta["model_family"].value == "cosyvoice1" and meta["recipe"].value.endswith(V1_TINY)
    assert meta["cv_loss"].value > 0
    state = torch.load(str(root / "llm" / "llm.pt"), weights_only=True)
    from cosyvoice.config import load_recipe, training_overrides

    model = load_recipe(V1_TINY, training_overrides("llm"))["llm"]
    assert type(model).__name__ == "TransformerLM"
    assert {k for k in state if torch.is_tensor(state[k])} == set(model.state_dict())
    assert state["llm_decoder.weight"].shape == (4097, 32) and state["speech_embedding.weight"].shape == (4096, 32)
    assert state["text_embedding.weight"].shape == (51866, 16)
    model.load_state_dict({k: v for k, v in state.items() if torch.is_tensor(v)}, strict=True)

    assert exported.success and not exported.get_asset_materialization_events()
    skipped = {e.step_key for e in exported.all_events if e.event_type_value == "STEP_SKIPPED"}
    assert skipped == {"trtllm_checkpoint"}
    (reason,) = [m for m in export_logs if "hf_checkpoint skipped" in m]
    assert "cosyvoice1" in reason and "not a Qwen2 model" in reason and "python-backend" in reason
    assert not os.path.exists(root / "export" / "hf")


def test_the_v1_recipe_trains_flow_and_hift_previewed_and_averaged_as_22khz_cosyvoice1_modules(v1_run):
    from cosyvoice.acoustic.flow_v1 import FlowV1Model, load_flow_v1
    from cosyvoice.acoustic.hift import load_hift
    from cosyvoice.acoustic.recipe import acoustic_configs_v1

    root, *_, (_, acoustic), _, _ = v1_run
    assert acoustic.success
    checks = {e.asset_key.path[-1]: e.passed for e in acoustic.get_asset_check_evaluations()}
    assert checks == {"flow_checkpoint": True, "hift_checkpoint": True}
    for name in ("flow", "hift"):
        meta = {k: v.value for k, v in acoustic.asset_materializations_for_node(f"{name}_checkpoint")[0].metadata.items()}
        assert meta["model_family"] == "cosyvoice1" and meta["preview_status"] == "rendered", meta
        assert "data:image/png;base64," in meta["preview"] and meta["preview_mel_l1"] >= 0
        # 22050 / 256 mel frames per second (a CosyVoice2 preview: 50); the flow's seconds are 50 Hz tokens
        assert abs(meta["preview_seconds"] * 22050 / 256 - meta["preview_frames"]) <= 1, (name, meta)
        averaged = acoustic.asset_materializations_for_node(f"{name}_averaged")[0].metadata
        assert averaged["path"].value.endswith(f"{name}/{name}.pt") and averaged["averaged"].value >= 1
    flow_config, hift_config = acoustic_configs_v1(V1_TINY)
    flow = load_flow_v1(str(root / "flow" / "flow.pt"), flow_config)  # strict: every key, every shape
    hift = load_hift(str(root / "hift" / "hift.pt"), hift_config)
    assert isinstance(flow, FlowV1Model) and flow.config.input_frame_rate == 50
    assert hift.config.sampling_rate == 22050 and hift.config.samples_per_frame == 256


def test_switching_back_to_a_v2_recipe_refuses_to_train_on_the_v1_tokens_before_launching(v1_run, tmp_path):
    *_, (instance, res) = v1_run
    res = {**res, "training": TrainingResource(model_dir=str(tmp_path / "llm"), recipe="configs/cosyvoice2-tiny.yaml")}
    result = dg.materialize([llm_checkpoint], instance=instance, resources=res, raise_on_error=False)
    assert not result.success and not (tmp_path / "llm").exists()
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.user_failure_data.description
    assert "trains cosyvoice2 on v2 speech tokens" in message and "extracted v1 tokens" in message
    assert "backfill speech_tokens and parquet_shards" in message


class CannedLoss(Launcher):
    """A train_launcher that launches nothing and reports the CV loss it is given."""

    cv_loss: float = 1.0

    def launch(self, context, cli_args, *, gpus_per_node=1, nodes=1, rdzv_endpoint=""):
        loss = self.cv_loss

        class Invocation:
            def get_custom_messages(self):
                return []

            def get_materialize_result(self):
                return dg.MaterializeResult(metadata={"cv_loss": dg.MetadataValue.float(loss)})

        return Invocation()


def test_the_cv_gate_does_not_compare_a_v1_loss_with_a_released_v2_one(tmp_path):
    (tmp_path / "train.data.list").write_text("a.tar\n")
    (tmp_path / "cv.data.list").write_text("a.tar\n")

    def gate(recipe, loss):
        res = {"store": DataStore(root=str(tmp_path)), "train_launcher": CannedLoss(cv_loss=loss),
               "training": TrainingResource(model_dir=str(tmp_path / "llm"), recipe=recipe)}
        result = dg.materialize([llm_checkpoint], instance=instance, resources=res, raise_on_error=False)
        return result.get_asset_check_evaluations()[0]

    with dg.instance_for_test() as instance:
        assert gate("configs/cosyvoice2-tiny.yaml", 2.0).passed
        v1 = gate(V1_TINY, 9.0)  # 4097 classes: a higher loss that says nothing about the v2 model
        assert v1.passed and v1.metadata["baseline_reset"].value
        assert "model family changed" in v1.description and "cosyvoice2 -> cosyvoice1" in v1.description
        assert not gate(V1_TINY, 9.5).passed  # within the family the released v1 run is the baseline


def test_a_v2_tokenizer_with_the_v1_recipe_is_refused_before_any_shard_is_written(small_corpus, tiny_models,
                                                                                    tmp_path, monkeypatch):
    res = v1_resources(small_corpus, tmp_path, tiny_models, monkeypatch)
    res["models"] = ModelStore(root=tiny_models, speech_tokenizer="speech_tokenizer_v2.onnx")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("shards", [SHARD])  # no manifest: the refusal comes before any read
        result = dg.materialize([speech_tokens], partition_key=SHARD, instance=instance, resources=res,
                                raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.user_failure_data.description
    assert "cosyvoice1 recipe" in message and "speech_tokenizer_v2.onnx" in message and "v1" in message
    assert not (tmp_path / "speech_tokens").exists()


def test_a_models_root_without_the_v1_tokenizer_is_named_before_any_shard_is_read(small_corpus, tmp_path, monkeypatch):
    """A CosyVoice2 model dir kept after switching the recipe to CosyVoice1: the missing file is named."""
    (tmp_path / "models").mkdir()
    res = v1_resources(small_corpus, tmp_path / "data", str(tmp_path / "models"), monkeypatch)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("shards", [SHARD])
        result = dg.materialize([speech_tokens], partition_key=SHARD, instance=instance, resources=res,
                                raise_on_error=False)
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.user_failure_data.description
    assert "speech_tokenizer_v1.onnx: no such model file" in message and "cosyvoice1 recipe" in message


def test_explicit_settings_of_the_recipes_generation_are_accepted_and_the_default_recipe_stays_v2(tiny_models):
    v1 = TrainingResource(model_dir="/m", recipe=V1_TINY)
    url, version = ModelStore(root=tiny_models, tokenizer_version="v1").speech_tokenizer_for(v1.family(), V1_TINY)
    assert url.endswith("speech_tokenizer_v1.onnx") and version == "v1"
    v2 = TrainingResource(model_dir="/m")
    url, version = ModelStore(root=tiny_models).speech_tokenizer_for(v2.family(), v2.recipe)
    assert url.endswith("speech_tokenizer_v2.onnx") and version == "v2"
    with pytest.raises(ValueError, match="tokenizer_version is 'v1'"):
        ModelStore(root=tiny_models, tokenizer_version="v1").speech_tokenizer_for(v2.family(), v2.recipe)
