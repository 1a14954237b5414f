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
    cli = subprocess.run([sys.executable, "-m", "cosyvoice.cli", "average-checkpoints", "--src_path", str(model_dir),
                          "--dst_model", str(tmp_path / "cli.pt"), "--num", "2"], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert torch.equal(torch.load(tmp_path / "cli.pt", weights_only=True)[key], avg[key])


def torchrun(args: list[str], nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "cosyvoice.cli", "train", *args]
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


def test_deepspeed_zero2_gives_the_ddp_losses(ddp_run, training_list, qwen_dir, tmp_path):
    pytest.importorskip("deepspeed")
    result = torchrun(cli_args(training_list, qwen_dir, tmp_path, "--max_epoch", "2", "--train_engine", "deepspeed",
                               "--deepspeed_config", os.path.join(ROOT, "configs", "ds_stage2.json")))
    assert result.returncode == 0, result.stderr[-3000:]
    ds = [r["loss"] for r in read_log(tmp_path)]
    ddp = [r["loss"] for r in read_log(ddp_run)][:2]
    assert ds == pytest.approx(ddp, rel=1e-4)
    assert os.path.isdir(tmp_path / "epoch_1_whole")  # DeepSpeed's own checkpoint
    weights, epoch, step = load_model_weights(str(tmp_path / "epoch_1_whole.pt"))  # and the flat upstream file
    assert (epoch, step) == (1, 2) and "llm_decoder.weight" in weights
    # the yaml lr (1e-3 in the tiny recipe) is used, not the DeepSpeed json's
    assert read_log(tmp_path)[0]["lr"] == pytest.approx(1e-3)


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
    with pytest.raises(ValueError, match="only the llm"):
        train(options(training_list, qwen_dir, tmp_path, model="flow"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        train(options(training_list, qwen_dir, tmp_path, checkpoint=str(tmp_path / "missing.pt")))
    with pytest.raises(ValueError, match="deepspeed_config"):
        train(options(training_list, qwen_dir, tmp_path, train_engine="deepspeed"))
    bad = tmp_path / "wrong_keys.pt"
    torch.save({"encoder.weight": torch.zeros(1), "epoch": 0, "step": 0}, bad)
    with pytest.raises(RuntimeError, match="Missing key"):  # strict, unlike upstream (D13)
        train(options(training_list, qwen_dir, tmp_path, checkpoint=str(bad)))


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

    from assets.training import TrainConfig, train_command
    from pipelines.multinode import MultiNodeLayout
    from pipelines.resources import TrainingResource

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    training = TrainingResource(model_dir=str(tmp_path), recipe=TINY_RECIPE, qwen_pretrain_path=qwen_dir,
                                python=sys.executable)
    config = TrainConfig(nodes=2, gpus_per_node=1, use_amp=False, num_workers=0, max_epoch=1,
                         extra_args=["--ddp.dist_backend", "gloo", "--log_interval", "1"])
    node0 = train_command(config, training, training_list, training_list, rdzv_endpoint=f"127.0.0.1:{port}")
    job = MultiNodeLayout("cv-train-test", 2).worker_job(image="x", command=node0, env={}, pod_spec={
        "containers": [{"name": "c"}]})
    node1 = job["spec"]["template"]["spec"]["containers"][0]["command"]
    env = {**os.environ, "JOB_COMPLETION_INDEX": "0"}
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in (node0, node1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    ours = [r["loss"] for r in read_log(tmp_path)]
    assert ours and ours == pytest.approx([r["loss"] for r in read_log(ddp_run)][:len(ours)], rel=1e-5)
