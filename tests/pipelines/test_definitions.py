import os
import subprocess
import sys

import dagster as dg
import pytest

from assets.manifest import manifest
from cosyvoice.layout import DataLayout
from pipelines.definitions import defs
from pipelines.partitions import SHARDS, SUBSETS
from pipelines.resources import PROJECT_ROOT, CorpusResource, DataStore, resources_for


def test_definitions_load_and_the_manifest_is_partitioned_by_the_seven_subsets():
    dg.Definitions.validate_loadable(defs)
    assert SUBSETS.get_partition_keys() == [
        "dev-clean", "test-clean", "dev-other", "test-other", "train-clean-100", "train-clean-360", "train-other-500"]
    assert defs.resolve_job_def("manifest_job") is not None


def test_distributed_deployment_reads_roots_from_the_environment(monkeypatch):
    monkeypatch.setenv("COSYVOICE_CORPUS_ROOT", "s3://corpus/LibriTTS")
    monkeypatch.setenv("COSYVOICE_DATA_ROOT", "s3://data/prefix")
    monkeypatch.setenv("COSYVOICE_MODEL_ROOT", "s3://models/cosyvoice2")
    with dg.build_resources(resources_for("distributed")) as res:
        assert res.corpus.subset_url("dev-clean") == "s3://corpus/LibriTTS/dev-clean"
        assert res.store.layout.manifest_dir("dev-clean") == "s3://data/prefix/manifest/dev-clean"
        assert res.models.campplus_url() == "s3://models/cosyvoice2/campplus.onnx"


def test_materializing_a_subset_writes_the_manifest_registers_shards_and_passes_checks(broken_corpus, tmp_path):
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [manifest], partition_key="train-clean-100", instance=instance,
            resources={"corpus": CorpusResource(root=broken_corpus), "store": DataStore(root=str(tmp_path))},
            run_config={"ops": {"manifest": {"config": {"utts_per_shard": 5}}}},
        )
        assert result.success
        (mat,) = result.asset_materializations_for_node("manifest")
        meta = {k: v.value for k, v in mat.metadata.items()}
        assert meta["utterances"] == 13 and meta["speakers"] == 4 and meta["quarantined"] == 10
        assert meta["quarantined_by_reason"]["truncated_audio"] == 1
        layout = DataLayout(str(tmp_path))
        assert meta["audio_hours"] > 0 and meta["path"] == layout.manifest_dir("train-clean-100")
        assert "data:image/png;base64," in meta["duration_histogram"]
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        assert checks == {"unique_utt_ids": True, "wavs_exist": True, "text_non_empty": True}
        assert instance.get_dynamic_partitions(SHARDS.name) == [
            "train-clean-100-000000", "train-clean-100-000001", "train-clean-100-000002"]
        assert os.path.exists(layout.shard_plan_file("train-clean-100"))
        assert [len(utts) for utts in layout.shard_plan("train-clean-100").values()] == [5, 5, 3]  # 13 kept, 5 a shard
        instance.add_dynamic_partitions(SHARDS.name, ["dev-clean-000000"])
        dg.materialize(
            [manifest], partition_key="train-clean-100", instance=instance,
            resources={"corpus": CorpusResource(root=broken_corpus), "store": DataStore(root=str(tmp_path))},
            run_config={"ops": {"manifest": {"config": {"utts_per_shard": 10}}}},
        )
        assert instance.get_dynamic_partitions(SHARDS.name) == [
            "train-clean-100-000000", "train-clean-100-000001", "dev-clean-000000"]


def test_a_failing_data_dir_check_surfaces_as_a_failed_asset_check(clean_corpus, tmp_path, monkeypatch):
    import assets.manifest as module
    from cosyvoice.corpus.checks import CheckOutcome, check_data_dir

    def damaged(url):
        outcomes = check_data_dir(url)
        outcomes["wavs_exist"] = CheckOutcome(False, "1 of 15 wav.scp paths missing", ["/gone.wav"])
        return outcomes

    monkeypatch.setattr(module, "check_data_dir", damaged)
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [manifest], partition_key="dev-clean", instance=instance,
            resources={"corpus": CorpusResource(root=clean_corpus), "store": DataStore(root=str(tmp_path))})
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not evaluations["wavs_exist"].passed and evaluations["unique_utt_ids"].passed
    assert evaluations["wavs_exist"].metadata["examples"].value == ["/gone.wav"]


def test_dagster_cli_materializes_a_partition_like_the_readme_says(broken_corpus, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "DAGSTER_HOME": str(home), "COSYVOICE_DATA_ROOT": str(tmp_path / "data"),
           "COSYVOICE_CORPUS_ROOT": broken_corpus}
    dagster = os.path.join(os.path.dirname(sys.executable), "dagster")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([dagster, "asset", "materialize", "-m", "pipelines.definitions", "--select", "manifest",
                          "--partition", "dev-clean"], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RUN_SUCCESS" in out.stderr + out.stdout
    assert (tmp_path / "data" / "manifest" / "dev-clean" / "wav.scp").read_text().count("\n") == 13
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_dynamic_partitions("shards") == ["dev-clean-000000"]


def test_each_deployment_chooses_its_launchers_and_reads_each_setting_from_one_environment_variable(monkeypatch):
    """Launchers are resources chosen per deployment (assets never branch on it); a setting from the
    environment is a dg.EnvVar of the resource, and the recipe has one default in both deployments:
    the project's configs/cosyvoice2.yaml (the checkout, or the images' WORKDIR)."""
    from pipelines.launchers import K8sEngineBuilder, K8sLauncher, LocalEngineBuilder, SubprocessLauncher

    for name in ("COSYVOICE_TRAIN_RECIPE", "COSYVOICE_K8S_NAMESPACE", "COSYVOICE_GPU_IMAGE", "COSYVOICE_QWEN_PRETRAIN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COSYVOICE_CORPUS_ROOT", "s3://corpus/LibriTTS")
    monkeypatch.setenv("COSYVOICE_DATA_ROOT", "s3://data/prefix")
    monkeypatch.setenv("COSYVOICE_MODEL_ROOT", "s3://models/cosyvoice2")
    distributed, embedded = resources_for("distributed"), resources_for("embedded")
    assert isinstance(distributed["train_launcher"], K8sLauncher)
    assert isinstance(distributed["engine_builder"], K8sEngineBuilder)
    assert isinstance(embedded["train_launcher"], SubprocessLauncher)
    assert isinstance(embedded["engine_builder"], LocalEngineBuilder)
    for resources in (distributed, embedded):
        with dg.build_resources(resources) as res:
            assert res.training.recipe_path() == os.path.join(PROJECT_ROOT, "configs", "cosyvoice2.yaml")
            assert os.path.exists(res.training.recipe_path())
    with dg.build_resources(embedded) as res:
        assert res.training.bundled_tokenizer and res.train_launcher.python == sys.executable

    monkeypatch.setenv("COSYVOICE_TRAIN_RECIPE", "/etc/cosyvoice/recipe.yaml")
    monkeypatch.setenv("COSYVOICE_K8S_NAMESPACE", "team-a")
    monkeypatch.setenv("COSYVOICE_GPU_IMAGE", "registry.example.com/gpu:2")
    distributed = resources_for("distributed")
    monkeypatch.setenv("COSYVOICE_K8S_NAMESPACE", "team-b")  # read when the resources are built, not at import
    with dg.build_resources(distributed) as res:
        assert res.training.recipe_path() == "/etc/cosyvoice/recipe.yaml"
        assert res.train_launcher.namespace == res.engine_builder.namespace == "team-b"
        assert res.train_launcher.image == "registry.example.com/gpu:2"
    with dg.build_resources(resources_for("embedded")) as res:
        assert res.training.recipe_path() == "/etc/cosyvoice/recipe.yaml"


def test_the_retrain_job_trains_and_averages_every_model_after_the_data_lists():
    graph = defs.resolve_asset_graph()
    job_keys = {k.to_user_string() for k in defs.resolve_job_def("retrain").asset_layer.executable_asset_keys}
    models = ("llm", "flow", "hift")
    assert job_keys == {"training_data_lists"} | {f"{m}_{kind}" for m in models for kind in ("checkpoint", "averaged")}
    for model in models:
        checkpoint = graph.get(dg.AssetKey(f"{model}_checkpoint"))
        assert checkpoint.group_name == "training" and checkpoint.pools == {"gpu"}
        assert checkpoint.parent_keys == {dg.AssetKey("training_data_lists")}
        assert graph.get(dg.AssetKey(f"{model}_averaged")).parent_keys == {checkpoint.key}
    serving = graph.get(dg.AssetKey("triton_model_repo"))
    assert {dg.AssetKey("flow_averaged"), dg.AssetKey("hift_averaged"), dg.AssetKey("hf_checkpoint")} <= serving.parent_keys


def test_every_checkpoint_has_its_own_blocking_cv_gate_and_the_averages_have_none():
    graph = defs.resolve_asset_graph()
    gates = {k.asset_key.to_user_string(): k.name for k in graph.asset_check_keys
             if k.asset_key.to_user_string().startswith(("llm_", "flow_", "hift_"))}
    assert gates == {f"{m}_checkpoint": "cv_loss_finite_and_not_worse" for m in ("llm", "flow", "hift")}
    for model in ("llm", "flow", "hift"):
        (spec,) = defs.get_assets_def(dg.AssetKey(f"{model}_checkpoint")).check_specs
        assert spec.blocking and spec.asset_key == dg.AssetKey(f"{model}_checkpoint")


def test_each_model_trains_into_its_own_root_chosen_per_deployment(monkeypatch):
    from pipelines.resources import TrainingResource

    training = TrainingResource(model_dir="/models/llm")
    assert [training.run_dir("r1", m) for m in ("llm", "flow", "hift")] == [
        "/models/llm/r1", "/models/flow/r1", "/models/hift/r1"]
    assert TrainingResource(model_dir="/m/llm", hift_model_dir="/gan").run_dir("r1", "hift") == "/gan/r1"
    with pytest.raises(ValueError, match="'hifigan' is not a trained model"):
        training.model_root("hifigan")
    for name in ("COSYVOICE_TRAIN_FLOW_MODEL_DIR", "COSYVOICE_TRAIN_HIFT_MODEL_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COSYVOICE_DATA_ROOT", "/data")
    with dg.build_resources(resources_for("embedded")) as res:
        assert res.training.model_root("flow") == "/data/train/flow" and res.training.model_root("hift") == "/data/train/hift"
    monkeypatch.setenv("COSYVOICE_TRAIN_FLOW_MODEL_DIR", "/pvc/flow")
    monkeypatch.setenv("COSYVOICE_CORPUS_ROOT", "s3://c")
    monkeypatch.setenv("COSYVOICE_MODEL_ROOT", "s3://m")
    with dg.build_resources(resources_for("distributed")) as res:
        assert res.training.model_root("flow") == "/pvc/flow" and res.training.model_root("hift") == "/models/hift"
