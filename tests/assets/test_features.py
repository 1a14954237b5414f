import os
import signal
import subprocess
import sys
import textwrap
import time

import dagster as dg
import pytest

from assets.features import speaker_embeddings, speaker_means, speech_tokens, upstream_feature_files
from assets.manifest import manifest
from assets.shards import parquet_shards, training_data_lists
from cosyvoice.features.feature_files import load_pt, read_parquet
from pipelines.resources import CorpusResource, DataStore, ModelStore, TrainingResource

SHARDS = ["dev-clean-000000", "dev-clean-000001", "dev-clean-000002"]


def resources(corpus, root, models):
    """The feature assets' resources; the training recipe (the default, CosyVoice2) picks the v2 tokenizer."""
    return {"corpus": CorpusResource(root=corpus), "store": DataStore(root=str(root)), "models": ModelStore(root=models),
            "training": TrainingResource(model_dir=os.path.join(str(root), "train", "llm"))}


def range_tags(first, last):
    return {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}


@pytest.fixture(scope="module")
def pipeline_run(clean_corpus, tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    res = resources(clean_corpus, root, tiny_models)
    with dg.instance_for_test() as instance:
        dg.materialize([manifest], partition_key="dev-clean", instance=instance, resources=res,
                       run_config={"ops": {"manifest": {"config": {"utts_per_shard": 5}}}})
        features = dg.materialize([speaker_embeddings, speech_tokens], instance=instance, resources=res,
                                  tags=range_tags(SHARDS[0], SHARDS[-1]),
                                  run_config={"ops": {n: {"config": {"num_workers": 2}}
                                                      for n in ("speaker_embeddings", "speech_tokens")}})
        per_subset = dg.materialize([speaker_means, upstream_feature_files], partition_key="dev-clean",
                                    instance=instance, resources=res)
        shards = dg.materialize([parquet_shards], instance=instance, resources=res,
                                tags=range_tags(SHARDS[0], SHARDS[-1]))
        lists = dg.materialize([training_data_lists], instance=instance, resources=res)
        yield root, features, per_subset, shards, lists


def test_one_run_materializes_several_shards_with_passing_checks(pipeline_run):
    root, features, *_ = pipeline_run
    assert features.success
    for asset in ("speaker_embeddings", "speech_tokens"):
        mats = features.asset_materializations_for_node(asset)
        assert sorted(m.partition for m in mats) == SHARDS
        # each partition's materialization carries its own shard's figures, not the whole run's
        assert [m.metadata["utterances"].value for m in mats] == [5, 5, 5]
        assert all(m.metadata["failed"].value == 0 and m.metadata["throughput_audio_s_per_s"].value > 0
                   for m in mats)
        assert "per_shard" not in mats[0].metadata
    checks = {(e.asset_key.path[-1], e.check_name): e.passed for e in features.get_asset_check_evaluations()}
    assert checks and all(checks.values())
    assert ("speech_tokens", "token_rate") in checks and ("speaker_embeddings", "dim_192_finite") in checks
    tokens = read_parquet(str(root / "speech_tokens" / "dev-clean" / "dev-clean-000001.parquet"))
    assert tokens.num_rows == 5 and tokens.schema.names == ["utt", "speech_token", "duration", "long_audio"]


def test_upstream_pt_files_equal_the_cli_drop_in(pipeline_run, tiny_models, tmp_path):
    import shutil

    from cosyvoice.features.stages import extract_embedding, extract_speech_token

    root, _, per_subset, *_ = pipeline_run
    assert per_subset.success
    manifest_dir = root / "manifest" / "dev-clean"
    direct = tmp_path / "direct"
    shutil.copytree(manifest_dir, direct)
    for name in ("utt2embedding.pt", "spk2embedding.pt", "utt2speech_token.pt"):
        (direct / name).unlink()
    extract_embedding(str(direct), os.path.join(tiny_models, "campplus.onnx"), num_workers=1)
    extract_speech_token(str(direct), os.path.join(tiny_models, "speech_tokenizer_v2.onnx"), num_workers=1)
    assert load_pt(str(manifest_dir / "utt2speech_token.pt")) == load_pt(str(direct / "utt2speech_token.pt"))
    ours, theirs = load_pt(str(manifest_dir / "utt2embedding.pt")), load_pt(str(direct / "utt2embedding.pt"))
    assert ours == theirs
    spk_ours, spk_theirs = load_pt(str(manifest_dir / "spk2embedding.pt")), load_pt(str(direct / "spk2embedding.pt"))
    assert sorted(spk_ours) == sorted(spk_theirs)
    assert all(max(abs(a - b) for a, b in zip(spk_ours[s], spk_theirs[s])) < 1e-6 for s in spk_ours)


KILLABLE = textwrap.dedent('''
    import sys, dagster as dg
    from assets.features import speaker_embeddings
    from pipelines.resources import CorpusResource, DataStore, ModelStore
    corpus, root, models, home = sys.argv[1:5]
    with dg.DagsterInstance.from_config(home) as instance:
        dg.materialize([speaker_embeddings], instance=instance,
                       resources={"corpus": CorpusResource(root=corpus), "store": DataStore(root=root),
                                  "models": ModelStore(root=models)},
                       tags={"dagster/asset_partition_range_start": sys.argv[5],
                             "dagster/asset_partition_range_end": sys.argv[6]},
                       run_config={"ops": {"speaker_embeddings": {"config": {"num_workers": 1}}}})
''')


def test_a_killed_run_leaves_no_partial_shard_and_a_rerun_matches_an_uninterrupted_run(
        pipeline_run, clean_corpus, tiny_models, tmp_path):
    reference_root, *_ = pipeline_run
    root = tmp_path / "data"
    (root / "manifest").mkdir(parents=True)
    import shutil

    shutil.copytree(reference_root / "manifest" / "dev-clean", root / "manifest" / "dev-clean")
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("shards", SHARDS)
    out = root / "speaker_embeddings" / "dev-clean"
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = [sys.executable, "-c", KILLABLE, clean_corpus, str(root), tiny_models, str(home), SHARDS[0], SHARDS[-1]]
    proc = subprocess.Popen(args, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (out.exists() and any(n.endswith(".parquet") for n in os.listdir(out))):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    visible = sorted(n for n in os.listdir(out) if n.endswith(".parquet"))
    assert 1 <= len(visible) < 3, visible
    for name in visible:  # whatever is visible is complete and final, its failure list written before it
        assert (out / name.replace(".parquet", ".failed.tsv")).exists()
        assert (out / name).read_bytes() == (reference_root / "speaker_embeddings" / "dev-clean" / name).read_bytes()
    rerun = subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert sorted(os.listdir(out)) == sorted(f"{s}{ext}" for s in SHARDS for ext in (".parquet", ".failed.tsv"))
    for shard in SHARDS:
        name = f"{shard}.parquet"
        assert (out / name).read_bytes() == (reference_root / "speaker_embeddings" / "dev-clean" / name).read_bytes()


def test_parquet_shards_equal_make_parquet_on_the_exported_pt_files(pipeline_run, tmp_path):
    import pyarrow.parquet as pq

    from cosyvoice.shards.make_parquet import make_parquet

    root, features, per_subset, shards, lists = pipeline_run
    assert shards.success and lists.success
    checks = {e.check_name: e.passed for e in shards.get_asset_check_evaluations()}
    assert checks == {"row_count": True, "schema_matches_contract": True, "failure_budget": True}
    parquet = {m.partition: m.metadata for m in shards.asset_materializations_for_node("parquet_shards")}
    tokens = {m.partition: m.metadata for m in features.asset_materializations_for_node("speech_tokens")}
    assert sorted(parquet) == sorted(tokens) == SHARDS
    for shard, meta in parquet.items():  # each partition reports its own shard
        assert meta["rows"].value == 5 and meta["skipped"].value == 0
        assert meta["audio_hours"].value == pytest.approx(tokens[shard]["audio_hours"].value, rel=1e-3)
    report = make_parquet(str(root / "manifest" / "dev-clean"), str(tmp_path / "cli"), num_utts_per_parquet=5)
    assert report.skipped == [] and per_subset.asset_materializations_for_node("upstream_feature_files")[0].metadata[
        "failed_extract_embedding.tsv"].value == 0  # the shards' failure lists are exported beside the .pt files
    assert (root / "manifest" / "dev-clean" / "failed_extract_speech_token.tsv").read_text().startswith("utt\tpath")
    for i in range(3):
        name = f"parquet_{i:09d}.tar"
        assert pq.read_table(str(root / "parquet" / "dev-clean" / name)).equals(pq.read_table(str(tmp_path / "cli" / name)))
    cv = (root / "cv.data.list").read_text().splitlines()
    assert cv == [str(root / "parquet" / "dev-clean" / f"parquet_{i:09d}.tar") for i in range(3)]
    assert (root / "train.data.list").read_text() == ""
    assert lists.asset_materializations_for_node("training_data_lists")[0].metadata["cv_shards"].value == 3


def test_speech_tokens_on_the_torch_runtime_write_the_onnxruntime_tokens(pipeline_run, clean_corpus, tiny_models,
                                                                         tmp_path):
    """The asset's runtime/batch options change how tokens are computed, not what is written."""
    root = pipeline_run[0]
    res = resources(clean_corpus, tmp_path, tiny_models)
    with dg.instance_for_test() as instance:
        dg.materialize([manifest], partition_key="dev-clean", instance=instance, resources=res,
                       run_config={"ops": {"manifest": {"config": {"utts_per_shard": 5}}}})
        result = dg.materialize([speech_tokens], partition_key=SHARDS[1], instance=instance, resources=res,
                                run_config={"ops": {"speech_tokens": {"config": {
                                    "runtime": "torch", "batch_size": 4, "num_workers": 1}}}})
    meta = result.asset_materializations_for_node("speech_tokens")[0].metadata
    assert meta["runtime"].value == "torch"
    name = os.path.join("speech_tokens", "dev-clean", f"{SHARDS[1]}.parquet")
    ours, reference = read_parquet(str(tmp_path / name)), read_parquet(str(root / name))
    assert ours.select(["utt", "speech_token"]).equals(reference.select(["utt", "speech_token"]))


def _gate(instance):
    """The retrain schedule's verdict on this instance: ``(failing checks, RunRequest | SkipReason)``."""
    from datetime import datetime, timezone

    from pipelines.definitions import defs
    from pipelines.schedules import failing_checks, retrain_schedule

    context = dg.build_schedule_context(instance=instance, repository_def=defs.get_repository_def(),
                                        scheduled_execution_time=datetime(2026, 11, 29, 3, tzinfo=timezone.utc))
    return failing_checks(instance, defs.resolve_asset_graph()), retrain_schedule(context)


def test_a_model_that_fails_every_utterance_fails_the_blocking_budget_and_holds_retraining(
        clean_corpus, tiny_models, tmp_path):
    res = resources(clean_corpus, tmp_path, tiny_models)
    res["models"] = ModelStore(root=tiny_models, campplus="speech_tokenizer_v2.onnx")  # the wrong model
    with dg.instance_for_test() as instance:
        dg.materialize([manifest], partition_key="dev-clean", instance=instance, resources=res,
                       run_config={"ops": {"manifest": {"config": {"utts_per_shard": 5}}}})
        result = dg.materialize([speaker_embeddings], partition_key=SHARDS[1], instance=instance, resources=res,
                                run_config={"ops": {"speaker_embeddings": {"config": {"num_workers": 1}}}},
                                raise_on_error=False)
        assert not result.success  # the blocking check fails the step: no green run with an empty shard
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        assert checks["failure_budget"] is False and checks["all_utterances_present"] is True
        meta = result.asset_materializations_for_node("speaker_embeddings")[0].metadata
        shard = {key: value.value for key, value in meta.items()}
        assert (shard["total"], shard["present"], shard["quarantined"], shard["failed"]) == (5, 0, 5, 5)
        assert len(shard["quarantined_utterances"]) == 5
        listed = (tmp_path / "speaker_embeddings" / "dev-clean" / f"{SHARDS[1]}.failed.tsv").read_text().splitlines()
        assert len(listed) == 6 and all(line.split("\t")[2:4] == ["extract_embedding", "model_error"]
                                        for line in listed[1:])
        failing, verdict = _gate(instance)
        assert failing == {"speaker_embeddings:failure_budget": [SHARDS[1]]}
        assert isinstance(verdict, dg.SkipReason) and "speaker_embeddings:failure_budget" in verdict.skip_message


def test_one_bad_clip_within_the_budget_is_quarantined_and_does_not_hold_retraining(
        clean_corpus, tiny_models, tmp_path):
    """Over the default 1 % budget (1 of 5 = 20 %) the clip's shard -- and only that shard of the
    backfill -- holds the gate; with a 25 % budget the shard is re-run alone, passes, and releases it.
    The training shard lists the clip with the embedding stage's reason."""
    import json
    import shutil

    import numpy as np
    import soundfile as sf

    corpus = tmp_path / "LibriTTS"
    shutil.copytree(clean_corpus, corpus)
    root = tmp_path / "data"
    res = resources(str(corpus), root, tiny_models)
    budget = {"num_workers": 1, "max_failed_fraction": 0.25}
    with dg.instance_for_test() as instance:
        dg.materialize([manifest], partition_key="dev-clean", instance=instance, resources=res,
                       run_config={"ops": {"manifest": {"config": {"utts_per_shard": 5}}}})
        bad = json.loads((root / "manifest" / "dev-clean" / "shards.json").read_text())[SHARDS[1]][2]
        wav = dict(line.split() for line in (root / "manifest" / "dev-clean" / "wav.scp").read_text().splitlines())
        sf.write(wav[bad], np.full(480, 0.1, dtype=np.float32), 24000, subtype="PCM_16")  # now a 20 ms clip
        strict = dg.materialize([speaker_embeddings], instance=instance, resources=res,
                                tags=range_tags(SHARDS[0], SHARDS[-1]), raise_on_error=False,
                                run_config={"ops": {"speaker_embeddings": {"config": {"num_workers": 1}}}})
        assert not strict.success
        failing, verdict = _gate(instance)
        assert failing == {"speaker_embeddings:failure_budget": [SHARDS[1]]} and isinstance(verdict, dg.SkipReason)

        features = dg.materialize([speaker_embeddings], partition_key=SHARDS[1], instance=instance, resources=res,
                                  run_config={"ops": {"speaker_embeddings": {"config": budget}}})
        tokens = dg.materialize([speech_tokens], partition_key=SHARDS[1], instance=instance, resources=res,
                                run_config={"ops": {"speech_tokens": {"config": budget}}})
        dg.materialize([speaker_means], partition_key="dev-clean", instance=instance, resources=res)
        shards = dg.materialize([parquet_shards], partition_key=SHARDS[1], instance=instance, resources=res,
                                run_config={"ops": {"parquet_shards": {"config": {"max_failed_fraction": 0.25}}}})
        for result in (features, tokens, shards):
            assert result.success and all(e.passed for e in result.get_asset_check_evaluations())
        shard = {k: v.value for k, v in features.asset_materializations_for_node("speaker_embeddings")[0].metadata.items()}
        assert (shard["total"], shard["present"], shard["quarantined"], shard["failed"]) == (5, 4, 1, 1)
        assert shard["quarantined_utterances"] == [f"{bad}: feature_error"]
        listed = (root / "parquet" / "dev-clean" / "parquet_000000001.failed.tsv").read_text().splitlines()
        assert [line.split("\t")[:4] for line in listed[1:]] == [[bad, wav[bad], "extract_embedding", "feature_error"]]
        meta = shards.asset_materializations_for_node("parquet_shards")[0].metadata
        assert meta["rows"].value == 4 and meta["quarantined"].value == 1
        failing, verdict = _gate(instance)
        assert failing == {} and isinstance(verdict, dg.RunRequest)


def test_the_cli_faces_write_what_the_assets_write(pipeline_run, tiny_models, tmp_path):
    """Each asset and its subcommand call one function (cosyvoice/stages.py), so the subcommands run
    shard by shard on a copy of the manifest write the assets' files: the per-shard feature tables,
    the speaker means, the upstream .pt files, the training shards and the lists."""
    import shutil

    import pyarrow.parquet as pq

    from cosyvoice.cli import main
    from cosyvoice.layout import DataLayout

    root = pipeline_run[0]
    ours, theirs = DataLayout(str(root)), DataLayout(str(tmp_path / "cli"))
    manifest_dir = theirs.manifest_dir("dev-clean")
    shutil.copytree(ours.manifest_dir("dev-clean"), manifest_dir,
                    ignore=shutil.ignore_patterns("*.pt", "failed_*.tsv", "shards"))
    for shard in SHARDS:
        for command, model, stage in (("extract-embedding", "campplus.onnx", "speaker_embeddings"),
                                      ("extract-speech-token", "speech_tokenizer_v2.onnx", "speech_tokens")):
            assert main([command, "--dir", manifest_dir, "--onnx_path", os.path.join(tiny_models, model),
                         "--num_thread", "1", "--shard", shard, "--parquet", theirs.shard_file(stage, shard)]) == 0
            assert read_parquet(theirs.shard_file(stage, shard)).equals(read_parquet(ours.shard_file(stage, shard)))
    pipeline_flags = ["--data_root", theirs.root, "--subset", "dev-clean"]
    assert main(["speaker-means", *pipeline_flags]) == 0
    assert read_parquet(theirs.speaker_means("dev-clean")).equals(read_parquet(ours.speaker_means("dev-clean")))
    assert main(["upstream-feature-files", *pipeline_flags]) == 0
    for name in ("utt2embedding.pt", "spk2embedding.pt", "utt2speech_token.pt"):
        assert load_pt(os.path.join(manifest_dir, name)) == load_pt(os.path.join(ours.manifest_dir("dev-clean"), name))
    for shard in SHARDS:
        assert main(["make-parquet", "--src_dir", manifest_dir, "--des_dir", theirs.parquet_dir("dev-clean"),
                     "--shard", shard]) == 0
        assert pq.read_table(theirs.shard_file("parquet_shards", shard)).equals(
            pq.read_table(ours.shard_file("parquet_shards", shard)))
    assert main(["training-data-lists", "--data_root", theirs.root, "--cv_subsets", "dev-clean"]) == 0
    with open(theirs.cv_list()) as f:
        assert f.read().splitlines() == [theirs.shard_file("parquet_shards", s) for s in SHARDS]
    with open(theirs.train_list()) as f:
        assert f.read() == ""
