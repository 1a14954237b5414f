"""``bench/capacity.py`` computes the capacity model from the benchmarks' JSON: the formula on the
measured rates, "unmeasured" (never a figure) where an input is missing, linear in the corpus' hours."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def capacity():
    spec = importlib.util.spec_from_file_location("bench_capacity", os.path.join(REPO, "bench", "capacity.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture()
def results(tmp_path):
    """features: 36 audio s/s per core (embeddings), 9 (tokens); shards: 180 per core, 48 kB per audio second."""
    figures = {
        "features": {"benchmark": "features", "date": "2026-12-02", "cores": 2, "workers": 2, "utterances": 200,
                     "audio_seconds": 720.0, "kinds": {"embedding": {"ours_seconds": 10.0},
                                                       "speech_token": {"ours_seconds": 40.0}}},
        "shards": {"benchmark": "shards", "date": "2026-12-02", "cores": 2, "processes": 2, "audio_seconds": 3600.0,
                   "output_bytes": 3600 * 48_000, "ours": {"seconds": 10.0}},
    }
    for name, data in figures.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    return tmp_path


def run(capacity, capsys, results, *flags):
    plan = capacity.main(["--results", str(results), "--cpu_cores", "68", "--reserved_cores", "8", "--run_pod_cpu", "1",
                          "--step_cpu", "2", "--gpus", "4", "--gpu_step_cpu", "8", *flags])
    return plan, capsys.readouterr().out


def test_stage_times_follow_from_the_measured_rates(capacity, capsys, results):
    plan, _ = run(capacity, capsys, results, "--hours", "1000")
    audio = 1000 * 3600
    assert plan.cluster.cpu_runs == 20 and plan.cluster.working_cores == 40  # (68 - 8) // (1 + 2) runs x 2 cores
    assert plan.stage("speaker_embeddings").seconds == pytest.approx(audio / (36 * 40))
    assert plan.stage("parquet_shards").seconds == pytest.approx(audio / (180 * 40))
    assert plan.stage("speech_tokens (device=cpu in the GPU steps)").seconds == pytest.approx(audio / (9 * 4 * 8))
    phase, side = plan.features_phase()  # tokens on 32 cores are slower than the CPU pool's 40
    assert phase == pytest.approx(audio / (9 * 32)) and side == "tokens on the GPU steps' CPUs"


def test_missing_inputs_are_unmeasured_and_given_rates_are_labelled(capacity, capsys, results):
    plan, out = run(capacity, capsys, results)
    for name in ("manifest", "speech_tokens (GPU)"):
        assert plan.stage(name).seconds is None and plan.stage(name).rate.source.startswith("unmeasured")
    assert plan.training.seconds is None
    manifest_rows = [line for line in out.splitlines() if line.split("  ")[0] == "manifest"]
    assert len(manifest_rows) == 2 and all("unmeasured" in line for line in manifest_rows)  # stage, critical path
    assert "total" in out and ">= " in out and "(without: manifest" in out
    assert "unmeasured" in next(line for line in out.splitlines() if line.startswith("all "))  # no object_store.json
    given, out = run(capacity, capsys, results, "--gpu_tokens_rate", "500", "--gpu_train_tokens_per_s", "10000")
    assert given.stage("speech_tokens (GPU)").seconds == pytest.approx(1e5 * 3600 / (500 * 4))
    assert given.training.seconds == pytest.approx(1e5 * 3600 * 25 / (10000 * 4))
    assert "--gpu_tokens_rate (given, not measured)" in out


def test_the_model_is_linear_in_hours(capacity, capsys, results):
    small, _ = run(capacity, capsys, results, "--hours", "1000", "--gpu_tokens_rate", "500")
    large, _ = run(capacity, capsys, results, "--hours", "3000", "--gpu_tokens_rate", "500")
    measured = [(a, b) for a, b in zip(small.stages, large.stages) if a.rate.known]
    assert [a.name for a, _ in measured] == [s.name for s in small.stages if s.name != "manifest"]
    for a, b in measured:
        assert b.seconds == pytest.approx(3 * a.seconds), a.name
    assert large.features_phase()[0] == pytest.approx(3 * small.features_phase()[0])


def test_control_plane_figures_are_scaled_to_the_corpus(capacity, capsys, results):
    """bench/control_plane.py's result at 5k shards: request time scales with the runs, PostgreSQL growth with
    the shards."""
    measured = {"partitions": 5000, "asset_partitions": 15000, "shards_per_run": 8, "runs_created": 1875,
                "all_runs_requested_s": 60.0, "partition_status": {"worst_s": 0.5}, "db_growth_bytes": 2**30,
                "instigators": {"prepare_subset_shards": {"seconds": 0.2}, "corpus_sensor": {"seconds": 0.1},
                                "retrain_schedule_gate": {"seconds": 1.5}}}
    (results / "control_plane.json").write_text(json.dumps({"results": [measured]}))
    plan, out = run(capacity, capsys, results, "--hours", str(50_000 * 1000 * 7.2 / 3600))
    assert plan.corpus.shards == 50_000
    rows = {row[0]: row for row in capacity.control_plane_table(plan)}
    assert plan.corpus.shards_per_run == 8  # 6,250 runs at 0.032 s each fit the 10-minute goal
    assert rows["time until every run is requested"][2] == "3.3 min (6,250 runs x 0.03 s per run measured)"
    assert rows["PostgreSQL growth (backfill)"][2].startswith("10.00 GiB")
    assert rows["retrain schedule gate"][1] == "1.50 s (control-plane run)"
    launches = next(r for r in capacity.saturation_table(plan) if r[0].startswith("runs requested"))
    assert launches[2] == "31.2 runs/s measured"  # 1875 runs in 60 s


def test_the_batch_is_raised_until_the_runs_are_requested_within_the_goal(capacity, capsys, results):
    """At 1 s per run, 50k shards in runs of 8 would take 104 min to request: the model picks 100 (500 runs)."""
    measured = {"partitions": 50_000, "shards_per_run": 100, "runs_created": 500, "all_runs_requested_s": 500.0}
    (results / "control_plane.json").write_text(json.dumps({"results": [measured]}))
    plan, _ = run(capacity, capsys, results, "--hours", str(50_000 * 1000 * 7.2 / 3600))
    assert plan.corpus.shards_per_run == 100 and plan.corpus.runs_per_asset == 500
    rows = {row[0]: row for row in capacity.control_plane_table(plan)}
    assert rows["time until every run is requested"][2] == "8.3 min (500 runs x 1.00 s per run measured)"
    forced, _ = run(capacity, capsys, results, "--hours", str(50_000 * 1000 * 7.2 / 3600), "--shards_per_run", "8")
    assert forced.corpus.runs_per_asset == 6250  # an explicit batch is kept


def test_the_scaling_doc_shows_what_the_script_computes(capacity):
    doc = os.path.join(REPO, "docs", "scaling.md")
    argv, body = capacity.doc_block(doc)
    assert body.strip() == capacity.compute(argv)[1].strip(), (
        "docs/scaling.md is stale (a benchmark's JSON changed): run `python bench/capacity.py --update_doc`")


def test_update_doc_rewrites_only_the_block(capacity, results, tmp_path):
    doc = tmp_path / "doc.md"
    command = f"--results {results} --hours 10 --markdown"
    doc.write_text(f"before\n<!-- capacity: begin python bench/capacity.py {command} -->\nold\n"
                   "<!-- capacity: end -->\nafter\n")
    assert capacity.update_doc(str(doc)) and not capacity.update_doc(str(doc))
    text = doc.read_text()
    assert text.startswith("before\n<!-- capacity") and text.endswith("<!-- capacity: end -->\nafter\n")
    assert "| speaker_embeddings | CPU pool" in text and "\nold\n" not in text
