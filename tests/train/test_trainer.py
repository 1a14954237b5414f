"""The trainer end to end on the tiny recipe (CPU): files, exact resume, DDP, DeepSpeed, DPO, online features."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from cosyvoice.train.checkpoint import average_checkpoints, load_model_weights
from cosyvoice.train.trainer import TrainOptions, train

from .conftest import ROOT, TINY_RECIPE


def options(training_list, qwen_dir, model_dir, **kw) -> TrainOptions:
    base = dict(config=TINY_RECIPE, train_data=training_list, cv_data=training_list, model_dir=str(model_dir),
                qwen_pretrain_path=qwen_dir, tensorboard_dir=str(model_dir) + "/tb", dist_backend="gloo",
                log_interval=1)
    base.update(kw)
    return TrainOptions(**base)


def read_log(model_dir, tag="TRAIN"):
    with open(os.path.join(model_dir, "train_log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["tag"] == tag]


@pytest.fixture(scope="module")
def full_run(training_list, qwen_dir, tmp_path_factory):
    """Two epochs, a checkpoint after every optimizer step."""
    model_dir = tmp_path_factory.mktemp("full")
    report = train(options(training_list, qwen_dir, model_dir, max_epoch=2, save_per_step=1))
    return model_dir, report


def test_a_run_writes_the_upstream_checkpoint_files(full_run):
    model_dir, report = full_run
    assert report.steps == 4 and len(report.train_losses) == 4
    names = sorted(f for f in os.listdir(model_dir) if f.endswith(".pt") and ".state" not in f)
    assert names == ["epoch_0_step_1.pt", "epoch_0_step_2.pt", "epoch_0_whole.pt", "epoch_1_step_3.pt",
                     "epoch_1_step_4.pt", "epoch_1_whole.pt", "init.pt"]
    sd = torch.load(os.path.join(model_dir, "epoch_1_whole.pt"), weights_only=True)
    assert sd["epoch"] == 1 and sd["step"] == 4
    from cosyvoice.config import load_recipe, training_overrides

    fresh = load_recipe(TINY_RECIPE, training_overrides("llm", report.model_dir and None))["llm"]
    weights, epoch, step = load_model_weights(os.path.join(model_dir, "epoch_1_whole.pt"))
    fresh.load_state_dict(weights, strict=True)
    info = yaml.safe_load(open(os.path.join(model_dir, "epoch_0_step_2.yaml")))
    assert info["epoch"] == 0 and info["step"] == 2 and info["tag"] == "CV"
    assert info["loss_dict"]["loss"] == pytest.approx(read_log(model_dir, "CV")[1]["loss"])
    assert info["train_engine"] == "torch_ddp" and info["dtype"] == "fp32" and "save_time" in info
    records = read_log(model_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss", "acc", "lr", "grad_norm", "tokens_per_s", "epoch"} <= set(records[0])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(model_dir, "tb")))


@pytest.mark.parametrize("resume_from", ["epoch_0_step_1.pt", "epoch_0_whole.pt", "epoch_1_step_3.pt"])
def test_a_resumed_run_continues_with_the_same_losses(full_run, training_list, qwen_dir, tmp_path, resume_from):
    model_dir, report = full_run
    resumed = train(options(training_list, qwen_dir, tmp_path, max_epoch=2, save_per_step=1,
                            checkpoint=os.path.join(model_dir, resume_from)))
    done = {"epoch_0_step_1.pt": 1, "epoch_0_whole.pt": 2, "epoch_1_step_3.pt": 3}[resume_from]
    assert resumed.steps == 4
    assert resumed.train_losses == report.train_losses[done:]
    assert [r["step"] for r in read_log(tmp_path)] == list(range(done + 1, 5))


def test_a_killed_run_resumes_exactly(full_run, training_list, qwen_dir, tmp_path):
    """Stop after 3 optimizer steps (as a kill after the checkpoint would), resume, compare."""
    model_dir, report = full_run
    first = train(options(training_list, qwen_dir, tmp_path / "a", max_epoch=2, max_steps=3))
    assert first.steps == 3 and os.path.exists(tmp_path / "a" / "epoch_1_step_3.pt")
    second = train(options(training_list, qwen_dir, tmp_path / "a", max_epoch=2,
                           checkpoint=str(tmp_path / "a" / "epoch_1_step_3.pt")))
    assert first.train_losses + second.train_losses == report.train_losses


def test_averaging_takes_the_best_cv_checkpoints(full_run, tmp_path):
    model_dir, _ = full_run
    out = tmp_path / "llm.pt"
    report = average_checkpoints(str(model_dir), str(out), num=2, val_best=True)
    cv = {os.path.basename(p["yaml"])[:-5]: p["loss"] for p in
          [dict(yaml=os.path.join(model_dir, f), loss=yaml.safe_load(open(os.path.join(model_dir, f)))["loss_dict"]["loss"])
           for f in os.listdir(model_dir) if f.startswith("epoch") and f.endswith(".yaml")]}
    best = sorted(cv.values())[:2]
    assert report.losses == pytest.approx(best)
    avg = torch.load(out, weights_only=True)
    assert "epoch" not in avg and "step" not in avg
    a, _, _ = load_model_weights(report.sources[0])
    b, _, _ = load_model_weights(report.sources[1])
    key = "llm_decoder.weight"
    assert torch.allclose(avg[key], (a[key] + b[key]) / 2)
    with pytest.raises(ValueError, match="only"):
        average_checkpoints(str(model_dir), str(out), num=50)
    everything = average_checkpoints(str(model_dir), str(tmp_path / "all.pt"), num=50, allow_fewer=True)
    assert len(everything.sources) == len(set(everything.sources)) < 50
    cli = subprocess.run([sys.executable, "-m", "cosyvoice.cli", "average-checkpoints", "--src_path", str(model_dir),
                          "--dst_model", str(tmp_path / "cli.pt"), "--num", "2"], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert torch.equal(torch.load(tmp_path / "cli.pt", weights_only=True)[key], avg[key])


def torchrun(args: list[str], nproc: int = 2, timeout: int = 600,
             entry: tuple[str, ...] = ("-m", "cosyvoice.cli")) -> subprocess.CompletedProcess:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={port}", *entry, "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def cli_args(training_list, qwen_dir, model_dir, *extra) -> list[str]:
    return ["--model", "llm", "--config", TINY_RECIPE, "--train_data", training_list, "--cv_data", training_list,
            "--model_dir", str(model_dir), "--qwen_pretrain_path", qwen_dir, "--tensorboard_dir",
            str(model_dir) + "/tb", "--ddp.dist_backend", "gloo", "--log_interval", "1", *extra]


@pytest.fixture(scope="module")
def ddp_run(training_list, qwen_dir, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("ddp")
    result = torchrun(cli_args(training_list, qwen_dir, model_dir, "--max_epoch", "3"))
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir


def test_two_process_ddp_learns_on_repeated_data(ddp_run):
    cv = [r["loss"] for r in read_log(ddp_run, "CV")]
    assert len(cv) == 3 and cv[0] > cv[1] > cv[2]
    assert [r["step"] for r in read_log(ddp_run)] == [1, 2, 3]  # 1 step per epoch and rank (2 shards each)


RECORDER = os.path.join(os.path.dirname(__file__), "record_micro_losses.py")
DS_ARGS = ("--train_engine", "deepspeed", "--deepspeed_config", os.path.join(ROOT, "configs", "ds_stage2.json"))


def micro_losses(model_dir) -> dict[int, list[float]]:
    """Per rank, the loss of every micro-batch in order (written by record_micro_losses.py)."""
    out = {}
    for name in sorted(os.listdir(model_dir)):
        if name.startswith("micro_losses.rank"):
            with open(os.path.join(model_dir, name)) as f:
                out[int(name[len("micro_losses.rank"):-len(".jsonl")])] = [json.loads(line)["loss"] for line in f]
    return out


@pytest.fixture(scope="module")
def ddp_resumed(ddp_run, training_list, qwen_dir, tmp_path_factory):
    """The 2-process run resumed from its second epoch, each rank recording its micro-batch losses."""
    model_dir = tmp_path_factory.mktemp("ddp_resumed")
    result = torchrun(cli_args(training_list, qwen_dir, model_dir, "--max_epoch", "3", "--checkpoint",
                               str(ddp_run / "epoch_1_whole.pt")), entry=(RECORDER,))
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir


def test_the_logged_loss_is_the_mean_over_ranks(ddp_resumed):
    per_rank = micro_losses(ddp_resumed)
    assert sorted(per_rank) == [0, 1] and len(per_rank[0]) == len(per_rank[1]) == 1
    assert per_rank[0][0] != pytest.approx(per_rank[1][0])  # different data on the two ranks
    (record,) = read_log(ddp_resumed)
    assert record["step"] == 3
    assert record["loss"] == pytest.approx((per_rank[0][0] + per_rank[1][0]) / 2, rel=1e-6)


def test_only_rank0_writes_the_training_state_and_a_2_process_resume_is_exact(ddp_run, ddp_resumed):
    names = os.listdir(ddp_run)
    checkpoints = sorted(f[:-3] for f in names if f.endswith(".pt") and ".state" not in f)
    assert checkpoints == ["epoch_0_whole", "epoch_1_whole", "epoch_2_whole", "init"]
    assert sorted(f for f in names if ".state" in f) == sorted(f"{c}.state.pt" for c in checkpoints)
    state = torch.load(ddp_run / "epoch_1_whole.state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rank_rngs"]) == 2 and state["optimizer"]["state"]
    ours = read_log(ddp_resumed)
    assert [(r["step"], r["loss"]) for r in ours] == [(3, pytest.approx(read_log(ddp_run)[2]["loss"], rel=1e-6))]
    assert read_log(ddp_resumed, "CV")[0]["loss"] == pytest.approx(read_log(ddp_run, "CV")[2]["loss"], rel=1e-6)


@pytest.fixture(scope="module")
def ds_run(training_list, qwen_dir, tmp_path_factory):
    pytest.importorskip("deepspeed")
    model_dir = tmp_path_factory.mktemp("deepspeed")
    result = torchrun(cli_args(training_list, qwen_dir, model_dir, "--max_epoch", "2", *DS_ARGS))
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir


def test_deepspeed_zero2_gives_the_ddp_losses(ddp_run, ds_run):
    tmp_path = ds_run
    ds = [r["loss"] for r in read_log(tmp_path)]
    ddp = [r["loss"] for r in read_log(ddp_run)][:2]
    assert ds == pytest.approx(ddp, rel=1e-4)
    assert os.path.isdir(tmp_path / "epoch_1_whole")  # DeepSpeed's own checkpoint
    weights, epoch, step = load_model_weights(str(tmp_path / "epoch_1_whole.pt"))  # and the flat upstream file
    assert (epoch, step) == (1, 2) and "llm_decoder.weight" in weights
    # the yaml lr (1e-3 in the tiny recipe) is used, not the DeepSpeed json's
    assert read_log(tmp_path)[0]["lr"] == pytest.approx(1e-3)
    # one training state (rank 0) next to each flat file; DeepSpeed's directory holds each rank's shard
    assert sorted(f for f in os.listdir(tmp_path) if ".state" in f) == [
        "epoch_0_whole.state.pt", "epoch_1_whole.state.pt", "init.state.pt"]
    assert len([f for f in os.listdir(tmp_path / "epoch_1_whole") if "optim_states" in f]) == 2


def test_deepspeed_resume_is_exact(ds_run, training_list, qwen_dir, tmp_path):
    result = torchrun(cli_args(training_list, qwen_dir, tmp_path, "--max_epoch", "2", *DS_ARGS,
                               "--checkpoint", str(ds_run / "epoch_0_whole.pt")))
    assert result.returncode == 0, result.stderr[-3000:]
    (resumed,) = read_log(tmp_path)
    original = read_log(ds_run)[1]
    assert resumed["step"] == 2 and resumed["loss"] == pytest.approx(original["loss"], rel=1e-6)
    assert resumed["lr"] == pytest.approx(original["lr"])
    assert read_log(tmp_path, "CV")[0]["loss"] == pytest.approx(read_log(ds_run, "CV")[1]["loss"], rel=1e-6)


def test_a_resume_whose_optimizer_state_is_missing_or_from_another_engine_fails(ds_run, training_list, qwen_dir,
                                                                              tmp_path):
    import shutil

    # a DeepSpeed state without DeepSpeed's directory (lost, or not copied along)
    partial = tmp_path / "partial"
    partial.mkdir()
    for suffix in (".pt", ".state.pt", ".yaml"):
        shutil.copy(ds_run / f"epoch_0_whole{suffix}", partial / f"epoch_0_whole{suffix}")
    result = torchrun(cli_args(training_list, qwen_dir, tmp_path / "out", "--max_epoch", "2", *DS_ARGS,
                               "--checkpoint", str(partial / "epoch_0_whole.pt")), nproc=1)
    assert result.returncode != 0
    assert "DeepSpeed optimizer/scheduler state" in result.stderr and "is missing" in result.stderr
    # a DeepSpeed checkpoint resumed by torch_ddp would silently start a fresh optimizer
    with pytest.raises(ValueError, match="--train_engine deepspeed"):
        train(options(training_list, qwen_dir, tmp_path / "ddp", max_epoch=2,
                      checkpoint=str(ds_run / "epoch_0_whole.pt")))


def test_dpo_training_logs_rewards_and_uses_the_reference_model(full_run, dpo_list, qwen_dir, tmp_path):
    model_dir, _ = full_run
    report = train(options(dpo_list, qwen_dir, tmp_path, max_epoch=3, dpo=True,
                           ref_model=os.path.join(model_dir, "epoch_1_whole.pt"),
                           checkpoint=os.path.join(model_dir, "epoch_1_whole.pt")))
    assert report.steps >= 1
    records = read_log(tmp_path)
    first = records[0]
    assert {"sft_loss", "dpo_loss", "dpo_acc", "chosen_reward", "reject_reward"} <= set(first)
    # policy == reference at the start: rewards 0, dpo loss log(2)
    assert first["chosen_reward"] == pytest.approx(0.0, abs=1e-6) and first["dpo_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert first["loss"] == pytest.approx(first["sft_loss"] + first["dpo_loss"], rel=1e-5)


def test_online_features_fill_in_tokens_and_embeddings(featureless_list, tiny_models, qwen_dir, tmp_path):
    import pyarrow.parquet as pq

    first = open(featureless_list).read().split()[0]
    assert "speech_token" not in pq.read_schema(first).names
    report = train(options(featureless_list, qwen_dir, tmp_path, max_epoch=1, onnx_path=tiny_models))
    assert report.steps >= 1 and report.cv_loss is not None


def test_token_budget_batches_are_packed_without_padding(training_list, qwen_dir, tmp_path):
    report = train(options(training_list, qwen_dir, tmp_path, max_epoch=1, batch_type="token", max_tokens_in_batch=700))
    records = read_log(tmp_path)
    assert report.steps >= 2
    assert all(r["padded_fraction"] == 0.0 for r in records)


def test_bad_invocations_fail_with_a_clear_message(training_list, qwen_dir, tmp_path):
    with pytest.raises(ValueError, match="choose one of llm, flow, hifigan"):
        train(options(training_list, qwen_dir, tmp_path, model="vocoder"))
    with pytest.raises(ValueError, match="--dpo apply to the LLM only"):
        train(options(training_list, qwen_dir, tmp_path, model="flow", dpo=True))
    with pytest.raises(FileNotFoundError, match="no such file"):
        train(options(training_list, qwen_dir, tmp_path, checkpoint=str(tmp_path / "missing.pt")))
    with pytest.raises(ValueError, match="deepspeed_config"):
        train(options(training_list, qwen_dir, tmp_path, train_engine="deepspeed"))
    bad = tmp_path / "wrong_keys.pt"
    torch.save({"encoder.weight": torch.zeros(1), "epoch": 0, "step": 0}, bad)
    with pytest.raises(RuntimeError, match="Missing key"):  # strict, unlike upstream (D13)
        train(options(training_list, qwen_dir, tmp_path, checkpoint=str(bad)))


def test_missing_qwen_weights_stop_training_unless_random_init_is_asked_for(training_list, qwen_dir, tmp_path):
    from cosyvoice.cli import build_parser
    from cosyvoice.train.trainer import Trainer

    recipe = tmp_path / "no-random-init.yaml"
    text = open(TINY_RECIPE).read()
    assert "allow_random_init: True" in text
    recipe.write_text(text.replace("allow_random_init: True", ""))
    with pytest.raises(ValueError, match=f"qwen_pretrain_path '{qwen_dir}' holds no Qwen2 weights.*model.safetensors"):
        train(options(training_list, qwen_dir, tmp_path / "a", config=str(recipe)))
    assert not os.path.exists(tmp_path / "a" / "init.pt")
    # asked for: the flag (tests, benches) ...
    trainer = Trainer(options(training_list, qwen_dir, tmp_path / "b", config=str(recipe), allow_random_init=True))
    trainer.reporter.close()
    args = build_parser().parse_args(["train", *cli_args(training_list, qwen_dir, tmp_path / "c", "--allow_random_init")])
    assert args.allow_random_init is True
    # ... or a checkpoint that replaces every weight (fine-tuning from a released llm.pt)
    from cosyvoice.train.checkpoint import save_model_files

    released = save_model_files(trainer.model.state_dict(), str(tmp_path / "released"), "llm", {"epoch": 0, "step": 0})
    Trainer(options(training_list, qwen_dir, tmp_path / "d", config=str(recipe), checkpoint=released)).reporter.close()


def test_compiled_and_eager_runs_write_the_same_checkpoint_keys(full_run, training_list, qwen_dir, tmp_path,
                                                                 monkeypatch):
    """``--compile`` on CPU. TorchDynamo traces the body as in any run; its backend is ``eager``
    here because inductor's C++ code generation takes minutes on a small CI machine, and how the
    compiled module is wrapped (hence the checkpoint keys) does not depend on the backend."""
    import functools

    from cosyvoice.config import load_recipe, training_overrides
    from cosyvoice.train.checkpoint import save_model_files

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    model_dir, _ = full_run
    compiled = train(options(training_list, qwen_dir, tmp_path / "compiled", max_steps=1, compile=True))
    weights, _, step = load_model_weights(compiled.final_checkpoint)
    eager, _, _ = load_model_weights(os.path.join(model_dir, "epoch_0_step_1.pt"))
    assert step == 1 and sorted(weights) == sorted(eager)
    assert not any("_orig_mod" in k for k in torch.load(compiled.final_checkpoint, weights_only=True))
    fresh = load_recipe(TINY_RECIPE, training_overrides("llm"))["llm"]
    fresh.load_state_dict(weights, strict=True)
    # an eager run resumes from the compiled run's checkpoint (strict load), and a compiled one from an eager checkpoint
    resumed = train(options(training_list, qwen_dir, tmp_path / "eager", max_steps=2,
                            checkpoint=compiled.final_checkpoint))
    assert resumed.steps == 2
    again = train(options(training_list, qwen_dir, tmp_path / "again", max_steps=2, compile=True,
                          checkpoint=os.path.join(model_dir, "epoch_0_step_1.pt")))
    assert again.steps == 2
    # files written by earlier --compile runs (torch.compile(module) prefixes) still load
    legacy = {k.replace("llm.model.model.", "llm.model.model._orig_mod."): v for k, v in eager.items()}
    path = save_model_files(legacy, str(tmp_path / "legacy"), "old", {"epoch": 0, "step": 1})
    assert not any("_orig_mod" in k for k in torch.load(path, weights_only=True))
    torch.save({**legacy, "epoch": 0, "step": 1}, tmp_path / "legacy" / "older.pt")
    fresh.load_state_dict(load_model_weights(str(tmp_path / "legacy" / "older.pt"))[0], strict=True)


def _recorded_losses(monkeypatch) -> list[float]:
    from cosyvoice.train.models import LLM

    recorded: list[float] = []
    original = LLM.turn

    def recording(self, part, engines, batch, device):
        out = original(self, part, engines, batch, device)
        recorded.append(float(out["loss"].detach()))
        return out

    monkeypatch.setattr(LLM, "turn", recording)
    return recorded


def test_with_accumulation_the_logged_loss_is_the_mean_of_the_micro_batches(training_list, qwen_dir, tmp_path,
                                                                             monkeypatch):
    recorded = _recorded_losses(monkeypatch)
    report = train(options(training_list, qwen_dir, tmp_path, max_epoch=1, accum_grad=2))
    assert len(recorded) == 2 and recorded[0] != pytest.approx(recorded[1])
    assert report.steps == 1
    (record,) = read_log(tmp_path)
    assert record["loss"] == pytest.approx((recorded[0] + recorded[1]) / 2, rel=1e-6)
    assert report.train_losses == [record["loss"]]


def test_an_incomplete_accumulation_window_at_epoch_end_is_stepped(training_list, qwen_dir, tmp_path, monkeypatch):
    """2 batches per epoch with accum_grad 3: every epoch ends with one step on its 2 micro-batches."""
    recorded = _recorded_losses(monkeypatch)
    steps = []
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: steps.append(1))
    try:
        report = train(options(training_list, qwen_dir, tmp_path, max_epoch=2, accum_grad=3))
    finally:
        handle.remove()
    assert len(recorded) == 4
    assert len(steps) == 2 and report.steps == 2
    assert [r["loss"] for r in read_log(tmp_path)] == pytest.approx(
        [(recorded[0] + recorded[1]) / 2, (recorded[2] + recorded[3]) / 2], rel=1e-6)
    init, _, _ = load_model_weights(str(tmp_path / "init.pt"))
    after, _, _ = load_model_weights(str(tmp_path / "epoch_1_whole.pt"))
    assert not torch.equal(init["llm_decoder.weight"], after["llm_decoder.weight"])


def _frames_per_utterance(data_list: str) -> list[float]:
    """Every utterance's length in 10 ms frames, read from the shards with soundfile."""
    import io

    import pyarrow.parquet as pq
    import soundfile

    frames = []
    for shard in open(data_list).read().split():
        for audio in pq.read_table(shard, columns=["audio_data"]).column("audio_data").to_pylist():
            info = soundfile.info(io.BytesIO(audio))
            frames.append(info.frames / info.samplerate * 100)
    return frames


def test_filtered_utterances_are_counted_per_epoch_across_workers(training_list, qwen_dir, tmp_path, monkeypatch):
    """Length filters that drop some utterances: with 2 DataLoader workers the counts of both reach
    the epoch's log line, the JSONL log, the report and the metadata reported through Pipes."""
    from cosyvoice.train.reporting import Reporter

    frames = sorted(_frames_per_utterance(training_list))
    assert frames[1] < frames[2] and frames[-3] < frames[-2]
    short_below, long_above = (frames[1] + frames[2]) / 2, (frames[-3] + frames[-2]) / 2  # 2 short, 2 long
    expected = {"too_short": 2, "too_long": 2}
    recipe = tmp_path / "filtering.yaml"
    text = open(TINY_RECIPE).read()
    assert "    max_length: 6000\n    min_length: 100\n" in text
    recipe.write_text(text.replace("    max_length: 6000\n    min_length: 100\n",
                                   f"    max_length: {long_above}\n    min_length: {short_below}\n"))
    reported = []
    monkeypatch.setattr(Reporter, "report_result", lambda self, metadata: reported.append(metadata))
    report = train(options(training_list, qwen_dir, tmp_path / "run", config=str(recipe), max_epoch=2, num_workers=2,
                           prefetch=2))
    assert report.data_stats == [{"epoch": 0, **expected}, {"epoch": 1, **expected}]
    logged = read_log(tmp_path / "run", "DATA")
    assert [{k: v for k, v in r.items() if k not in ("tag", "step", "time")} for r in logged] == report.data_stats
    (metadata,) = reported
    assert metadata["data_stats"] == report.data_stats
    assert metadata["data_totals"] == {"too_long": 4, "too_short": 4}


@pytest.mark.gpu
def test_gpu_bf16_packed_training_runs_and_reports_mfu(training_list, qwen_dir, tmp_path):
    report = train(options(training_list, qwen_dir, tmp_path, max_epoch=1, use_amp=True, batch_type="token",
                           max_tokens_in_batch=2048, dist_backend="nccl"))
    records = read_log(tmp_path)
    assert report.steps >= 1 and all(r["padded_fraction"] == 0.0 for r in records)
    assert report.mfu is not None and report.mfu > 0 and report.cv_loss is not None


def test_the_generated_multi_node_commands_train_like_one_node(ddp_run, training_list, qwen_dir, tmp_path):
    """Node 0's torchrun command (static rendezvous, node rank 0) and the Kubernetes worker's shell
    command (node rank from JOB_COMPLETION_INDEX), run as two 1-process "nodes" on this machine,
    give the losses of the 2-process single-node run: same world, same ranks, same data."""
    import socket

    from assets.training import TrainConfig, train_options
    from pipelines.launchers import SubprocessLauncher
    from pipelines.multinode import MultiNodeLayout
    from pipelines.resources import TrainingResource

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    training = TrainingResource(model_dir=str(tmp_path), recipe=TINY_RECIPE, qwen_pretrain_path=qwen_dir)
    config = TrainConfig(nodes=2, gpus_per_node=1, use_amp=False, num_workers=0, max_epoch=1,
                         extra_args=["--ddp.dist_backend", "gloo", "--log_interval", "1"])
    options = train_options(config, training, "run", training_list, training_list)
    node0 = SubprocessLauncher(python=sys.executable).command([*options.to_argv(), *config.extra_args], nodes=2,
                                                              rdzv_endpoint=f"127.0.0.1:{port}")
    job = MultiNodeLayout("cv-train-test", 2).worker_job(image="x", command=node0, env={}, pod_spec={
        "containers": [{"name": "c"}]})
    node1 = job["spec"]["template"]["spec"]["containers"][0]["command"]
    env = {**os.environ, "JOB_COMPLETION_INDEX": "0"}
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in (node0, node1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    ours = [r["loss"] for r in read_log(tmp_path / "run")]
    assert ours and ours == pytest.approx([r["loss"] for r in read_log(ddp_run)][:len(ours)], rel=1e-5)
