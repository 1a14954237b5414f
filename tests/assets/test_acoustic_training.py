"""``flow_checkpoint`` / ``hift_checkpoint`` and their averages, with a scripted trainer as the
``train_launcher`` resource: it parses the argv the asset launches (the real CLI parser), writes
checkpoints in the released layouts into the run dir it was given (tiny reference weights, through
the trainer's own ``save_model_files``) and reports like rank 0 does. The real trainer runs in
``tests/pipelines/test_demo_voice.py``."""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import ClassVar

import dagster as dg
import pytest
import torch

from assets.training import (
    LlmTrainConfig,
    TrainConfig,
    flow_averaged,
    flow_checkpoint,
    hift_averaged,
    hift_checkpoint,
    llm_checkpoint,
    train_options,
)
from pipelines.launchers import Launcher
from pipelines.resources import DataStore, TrainingResource
from tests.train.conftest import TINY_RECIPE

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ScriptedInvocation:
    def __init__(self, messages: list[dict], metadata: dict):
        self.messages, self.metadata = messages, metadata

    def get_custom_messages(self):
        return self.messages

    def get_materialize_result(self):
        return dg.MaterializeResult(metadata=self.metadata)


def weights(model: str, seed: int) -> dict:
    """Tiny reference weights of ``model`` (the trainer's name) in the released layout."""
    from cosyvoice.acoustic.reference import flow_state, hift_state

    return flow_state(seed, "tiny") if model == "flow" else hift_state(seed, "tiny")


class ScriptedTrainer(Launcher):
    """Writes ``epoch_{E}_whole.pt`` + ``.yaml`` per CV loss of ``cv_losses`` (seed E) into the run
    dir of the argv it gets and reports the last; ``layout`` = "hifigan" writes HiFT weights whatever
    the model (a checkpoint in another layout)."""

    cv_losses: ClassVar[list[float]] = [2.0, 1.5]
    layout: ClassVar[str | None] = None
    launched: ClassVar[list] = []

    def launch(self, context, cli_args, *, gpus_per_node=1, nodes=1, rdzv_endpoint=""):
        from cosyvoice.cli import build_parser
        from cosyvoice.train.checkpoint import save_model_files
        from cosyvoice.train.options import TrainOptions

        options = TrainOptions.from_args(build_parser().parse_args(list(cli_args)))
        ScriptedTrainer.launched.append(options)
        steps, last = [], None
        for epoch, loss in enumerate(ScriptedTrainer.cv_losses):
            if options.model != "llm":
                last = save_model_files(weights(ScriptedTrainer.layout or options.model, epoch), options.model_dir,
                                        f"epoch_{epoch}_whole", {"epoch": epoch, "step": 2 * epoch + 2,
                                                                 "loss_dict": {"loss": loss}})
            steps += [{"tag": "TRAIN", "step": s, "loss": loss + 1 / s, "lr": 1e-3, "frames_per_s": 100.0 * s}
                      for s in (2 * epoch + 1, 2 * epoch + 2)]
            steps.append({"tag": "CV", "step": 2 * epoch + 2, "loss": loss})
        metadata = {"cv_loss": dg.MetadataValue.float(ScriptedTrainer.cv_losses[-1]),
                    "steps": dg.MetadataValue.int(2 * len(ScriptedTrainer.cv_losses))}
        if last:
            metadata["checkpoint"] = dg.MetadataValue.text(last)
        return ScriptedInvocation(steps, metadata)


@pytest.fixture
def scripted(monkeypatch):
    monkeypatch.setattr(ScriptedTrainer, "launched", [])
    monkeypatch.setattr(ScriptedTrainer, "layout", None)
    monkeypatch.setattr(ScriptedTrainer, "cv_losses", [2.0, 1.5])
    return ScriptedTrainer


def resources(data_root: str, models: str) -> dict:
    return {"store": DataStore(root=data_root), "train_launcher": ScriptedTrainer(),
            "training": TrainingResource(model_dir=os.path.join(models, "llm"), recipe=TINY_RECIPE)}


def run_config(*assets, **train) -> dg.RunConfig:
    return dg.RunConfig(ops={a.key.to_user_string(): TrainConfig(num_workers=0, **train) for a in assets})


def test_flow_and_hift_train_in_their_own_run_dirs_show_a_preview_and_average_into_loadable_files(
        data_root, tmp_path, scripted):
    from cosyvoice.acoustic.flow import FlowConfig, load_flow
    from cosyvoice.acoustic.hift import HiFTConfig, load_hift
    from cosyvoice.train.checkpoint import load_model_weights

    res = resources(data_root, str(tmp_path))
    with dg.DagsterInstance.ephemeral() as instance:
        trained = dg.materialize([flow_checkpoint, hift_checkpoint], instance=instance, resources=res,
                                 run_config=run_config(flow_checkpoint, hift_checkpoint, max_steps=4))
        launched = {o.model: o for o in scripted.launched}
        assert set(launched) == {"flow", "hifigan"}
        flow_options, hift_options = launched["flow"], launched["hifigan"]
        assert flow_options.model_dir == str(tmp_path / "flow" / trained.run_id)
        assert hift_options.model_dir == str(tmp_path / "hift" / trained.run_id)
        assert flow_options.max_steps == 4 and not flow_options.dpo
        checks = {e.asset_key.to_user_string(): e.passed for e in trained.get_asset_check_evaluations()}
        assert checks == {"flow_checkpoint": True, "hift_checkpoint": True}
        for name, title in (("flow", "flow"), ("hift", "HiFT")):
            meta = {k: v.value for k, v in trained.asset_materializations_for_node(f"{name}_checkpoint")[0]
                    .metadata.items()}
            assert meta["loss_curve"].startswith(f"![{title} loss](data:image/png;base64,")
            assert meta["last_frames_per_s"] == 400.0 and meta["cv_loss"] == 1.5 and meta["recipe"] == TINY_RECIPE
            assert meta["preview_status"] == "rendered", meta.get("preview_reason")
            assert meta["preview"].startswith(f"![{title} preview: {meta['preview_utterance']}](data:image/png;base64,")
            assert meta["preview_frames"] > 0 and meta["preview_mel_l1"] > 0
            assert meta["run_dir"] == str(tmp_path / name / trained.run_id)

        averaged = dg.materialize([flow_averaged, hift_averaged], instance=instance, resources=res)
        for name, load, config in (("flow", load_flow, FlowConfig.tiny()), ("hift", load_hift, HiFTConfig.tiny())):
            meta = {k: v.value for k, v in averaged.asset_materializations_for_node(f"{name}_averaged")[0]
                    .metadata.items()}
            path = os.path.join(data_root, name, f"{name}.pt")
            assert meta["path"] == path and meta["averaged"] == 2 and meta["recipe"] == TINY_RECIPE
            assert meta[f"{name}_checkpoint_run_id"] == trained.run_id
            assert meta["sources"] == ["epoch_1_whole.pt", "epoch_0_whole.pt"]  # best CV loss first
            with open(path, "rb") as f:
                assert meta["sha256"] == hashlib.sha256(f.read()).hexdigest()
            load(path, config)  # strictly, in the runtime's module
            state, _, _ = load_model_weights(path)
            trainer_model = "flow" if name == "flow" else "hifigan"
            for key in list(state)[:3]:
                mean = (weights(trainer_model, 0)[key].double() + weights(trainer_model, 1)[key].double()) / 2
                torch.testing.assert_close(state[key].double(), mean)


def test_each_model_is_gated_against_its_own_released_checkpoint(data_root, tmp_path, scripted):
    res = resources(data_root, str(tmp_path))

    def train(asset, loss):
        scripted.cv_losses = [loss]
        result = dg.materialize([asset], instance=instance, resources=res, run_config=run_config(asset),
                                raise_on_error=False)
        (evaluation,) = result.get_asset_check_evaluations()
        assert evaluation.asset_key == asset.key
        return result.run_id, evaluation

    with dg.DagsterInstance.ephemeral() as instance:
        llm_run, llm = train(llm_checkpoint, 1.0)
        flow_run, flow = train(flow_checkpoint, 5.0)
        assert llm.passed and flow.passed and "first baseline" in flow.description  # never against the LLM's 1.0
        _, worse = train(flow_checkpoint, 6.0)
        assert not worse.passed and worse.metadata["baseline_run_id"].value == flow_run
        assert worse.metadata["baseline_cv_loss"].value == 5.0
        _, hift = train(hift_checkpoint, 9.0)
        assert hift.passed and "first baseline" in hift.description
        _, llm_again = train(llm_checkpoint, 1.0)
        assert llm_again.passed and llm_again.metadata["baseline_run_id"].value == llm_run


def test_a_checkpoint_that_does_not_load_strictly_fails_the_asset(data_root, tmp_path, scripted):
    scripted.layout = "hifigan"  # the trainer wrote HiFT weights for the flow
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize([flow_checkpoint], instance=instance, resources=resources(data_root, str(tmp_path)),
                                run_config=run_config(flow_checkpoint), raise_on_error=False)
        assert not result.success and not result.asset_materializations_for_node("flow_checkpoint")
        (failure,) = result.get_step_failure_events()
        message = failure.step_failure_data.user_failure_data.description
        assert "epoch_1_whole.pt: the trained flow does not load strictly" in message and "missing keys" in message


def test_a_preview_that_cannot_be_drawn_says_why_and_the_checkpoint_still_materializes(tmp_path, data_root, scripted):
    root = tmp_path / "store"
    root.mkdir()
    shutil.copy(os.path.join(data_root, "train.data.list"), root / "train.data.list")
    (root / "cv.data.list").write_text(f"{tmp_path}/gone/parquet_000000000.tar\n")
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize([hift_checkpoint], instance=instance, resources=resources(str(root), str(tmp_path)),
                                run_config=run_config(hift_checkpoint))
    meta = result.asset_materializations_for_node("hift_checkpoint")[0].metadata
    assert meta["preview_status"].value == "failed" and "gone/parquet_000000000.tar" in meta["preview_reason"].value
    assert meta["preview"].value.startswith("no HiFT preview (failed): ")
    assert result.get_asset_check_evaluations()[0].passed


def test_dpo_and_token_batches_are_refused_for_the_acoustic_models(data_root, tmp_path, scripted):
    with pytest.raises(dg.DagsterInvalidConfigError, match='"dpo"'):
        dg.materialize([flow_checkpoint], resources=resources(data_root, str(tmp_path)),
                       run_config={"ops": {"flow_checkpoint": {"config": {"dpo": True}}}})
    training = TrainingResource(model_dir="/m/llm")
    with pytest.raises(ValueError, match="LLM-only; the flow model trains by SFT"):
        train_options(LlmTrainConfig(dpo=True), training, "r", "t", "c", "flow")
    with pytest.raises(ValueError, match="batch_type token counts LLM tokens; the hift model"):
        train_options(TrainConfig(batch_type="token"), training, "r", "t", "c", "hift")
    llm = train_options(LlmTrainConfig(dpo=True, batch_type="token", max_tokens_in_batch=512), training, "r", "t", "c")
    assert llm.dpo and llm.model == "llm" and llm.max_tokens_in_batch == 512 and llm.model_dir == "/m/llm/r"
    assert not scripted.launched
