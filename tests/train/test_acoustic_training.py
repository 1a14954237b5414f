"""Flow matching and the HiFT GAN trained by the same trainer on the tiny recipe (CPU): losses fall,
resumes are exact, DDP and DeepSpeed agree (the GAN: two engines; the flow's one-engine path is the
LLM's, tested in test_trainer.py), and the averaged files load strictly into Token2Wav."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from cosyvoice.acoustic.recipe import acoustic_configs
from cosyvoice.train.checkpoint import average_checkpoints, load_model_weights
from cosyvoice.train.trainer import train

from .conftest import TINY_RECIPE
from .test_trainer import DS_ARGS, cli_args, options, read_log, torchrun


@pytest.fixture(scope="module")
def gan_recipe(tmp_path_factory) -> str:
    """The tiny recipe with GAN batches of 4 crops of 0.2 s (several steps per epoch) and a faster learning rate."""
    text = open(TINY_RECIPE).read()
    text = text.replace("    max_frames_in_batch: 2000", "    max_frames_in_batch: 40")
    text = text.replace("    truncate_length: 9600", "    truncate_length: 4800")  # 10 frames a crop
    text = text.replace("        lr: 0.0002", "        lr: 0.002")
    path = tmp_path_factory.mktemp("gan_recipe") / "cosyvoice2-tiny-gan.yaml"
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def cv_list(training_list, tmp_path_factory) -> str:
    """The first shard alone (4 utterances): the CV set of these runs, to keep CV passes cheap."""
    path = tmp_path_factory.mktemp("cv") / "cv.data.list"
    path.write_text(open(training_list).read().split()[0] + "\n")
    return str(path)


@pytest.fixture(scope="module")
def flow_run(training_list, cv_list, qwen_dir, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("flow")
    report = train(options(training_list, qwen_dir, model_dir, model="flow", max_epoch=2, save_per_step=2,
                           cv_data=cv_list))
    return model_dir, report


@pytest.fixture(scope="module")
def gan_run(training_list, cv_list, qwen_dir, gan_recipe, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("gan")
    report = train(options(training_list, qwen_dir, model_dir, model="hifigan", config=gan_recipe, max_epoch=2,
                           save_per_step=2, cv_data=cv_list))
    return model_dir, report


def test_flow_training_lowers_the_loss_and_writes_released_flow_files(flow_run):
    from cosyvoice.acoustic.flow import load_flow

    model_dir, report = flow_run
    records = read_log(model_dir)
    losses = [r["loss"] for r in records]
    assert report.steps == len(losses) >= 4 and report.unit == "frames"
    assert sum(losses[-2:]) < sum(losses[:2])
    assert {"loss", "lr", "grad_norm", "frames_per_s", "padded_fraction"} <= set(records[0])
    weights, epoch, step = load_model_weights(str(model_dir / "epoch_1_whole.pt"))
    assert (epoch, step) == (1, report.steps)
    load_flow(weights, acoustic_configs(TINY_RECIPE)[0])  # the released flow.pt layout, strictly
    cv = read_log(model_dir, "CV")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in cv)
    assert cv[-1]["loss"] < cv[0]["loss"]


def test_a_resumed_flow_run_continues_with_the_same_losses(flow_run, training_list, cv_list, qwen_dir, tmp_path):
    model_dir, _ = flow_run
    resumed = tmp_path / "resumed"
    train(options(training_list, qwen_dir, resumed, model="flow", max_epoch=2, save_per_step=2, cv_data=cv_list,
                  checkpoint=str(model_dir / "epoch_0_step_2.pt")))
    ours = [(r["step"], r["loss"]) for r in read_log(resumed)]
    theirs = {r["step"]: r["loss"] for r in read_log(model_dir)}
    assert ours and ours[0][0] == 3
    assert [loss for _, loss in ours] == pytest.approx([theirs[s] for s, _ in ours], rel=1e-6)


def test_gan_training_steps_both_optimizers_and_lowers_the_cv_loss(gan_run):
    from cosyvoice.acoustic.hift import load_hift

    model_dir, report = gan_run
    records = read_log(model_dir)
    assert report.steps == len(records) >= 6
    assert {"loss", "loss_gen", "loss_fm", "loss_mel", "loss_tpr", "loss_f0", "d_loss", "d_loss_disc",
            "d_loss_tpr", "frames_per_s"} <= set(records[0])
    cv = read_log(model_dir, "CV")  # the generator's losses on the same CV crops every time
    assert len(cv) >= 2 and cv[-1]["loss"] < cv[0]["loss"]
    assert all(np.isfinite(r[k]) for r in cv for k in ("loss_mel", "loss_gen", "loss_fm", "loss_f0"))
    weights, _, step = load_model_weights(str(model_dir / "epoch_1_whole.pt"))
    assert step == report.steps
    assert not any(k.startswith(("discriminator.", "generator.")) for k in weights)
    assert any(k.endswith(".weight_g") for k in weights) and any(k.endswith(".weight_v") for k in weights)
    load_hift(weights, acoustic_configs(TINY_RECIPE)[1])  # the released hift.pt layout, strictly
    state = torch.load(model_dir / "epoch_1_whole.state.pt", weights_only=True)
    assert state["model"] == "hifigan" and state["extra"]["discriminator"]
    assert set(state["optimizer"]) == set(state["scheduler"]) == {"discriminator", "generator"}


def test_a_resumed_gan_run_restores_both_optimizers_and_the_discriminator(gan_run, training_list, cv_list, qwen_dir,
                                                                         gan_recipe, tmp_path):
    model_dir, _ = gan_run
    resumed = tmp_path / "resumed"
    train(options(training_list, qwen_dir, resumed, model="hifigan", config=gan_recipe, max_epoch=2, max_steps=6,
                  save_per_step=2, checkpoint=str(model_dir / "epoch_0_step_4.pt"), cv_data=cv_list))
    keys = ("loss", "d_loss", "loss_mel")
    ours = [(r["step"], [r[k] for k in keys]) for r in read_log(resumed)]
    theirs = {r["step"]: [r[k] for k in keys] for r in read_log(model_dir)}
    assert [step for step, _ in ours] == [5, 6]
    for step, values in ours:
        assert values == pytest.approx(theirs[step], rel=1e-5)


def test_gan_refuses_accumulation(training_list, qwen_dir, gan_recipe, tmp_path):
    with pytest.raises(ValueError, match="accum_grad must be 1"):
        train(options(training_list, qwen_dir, tmp_path, model="hifigan", config=gan_recipe, accum_grad=2))


def test_averaged_acoustic_checkpoints_drive_token2wav(flow_run, gan_run, tmp_path):
    from cosyvoice.acoustic import CONFIG_FILE, FLOW_FILE, HIFT_FILE
    from cosyvoice.acoustic.token2wav import Token2Wav

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    average_checkpoints(str(flow_run[0]), str(model_dir / FLOW_FILE), num=2)
    average_checkpoints(str(gan_run[0]), str(model_dir / HIFT_FILE), num=2)
    shutil.copy(TINY_RECIPE, model_dir / CONFIG_FILE)
    t2w = Token2Wav(str(model_dir))
    tokens = np.arange(40, dtype=np.int64) * 37 % 6561
    prompt = np.zeros(0, dtype=np.int64)
    wav = t2w.synthesize(tokens, prompt, np.zeros((0, 80), dtype=np.float32), np.ones(192, dtype=np.float32))
    wav = np.asarray(wav).reshape(-1)
    assert wav.shape[0] == 40 * 960 and np.isfinite(wav).all() and np.abs(wav).max() > 0


def test_gan_deepspeed_gives_the_ddp_losses(training_list, cv_list, qwen_dir, gan_recipe, tmp_path):
    pytest.importorskip("deepspeed")
    runs = {}
    for name, extra in (("ddp", ()), ("ds", DS_ARGS)):
        args = cli_args(training_list, qwen_dir, tmp_path / name, "--max_epoch", "1", "--max_steps", "2",
                        "--model", "hifigan", *extra)
        args[args.index("--config") + 1] = gan_recipe
        args[args.index("--cv_data") + 1] = cv_list  # the final CV pass is not compared: one shard, not all
        result = torchrun(args)
        assert result.returncode == 0, result.stderr[-3000:]
        assert '"frames_per_s"' in result.stdout  # the CLI's summary line
        runs[name] = [(r["loss"], r["d_loss"]) for r in read_log(tmp_path / name)]
    assert len(runs["ddp"]) == 2
    assert [v for pair in runs["ds"] for v in pair] == pytest.approx([v for pair in runs["ddp"] for v in pair],
                                                                      rel=1e-4)
    assert os.path.isdir(tmp_path / "ds" / "epoch_0_step_2.generator")
    assert os.path.isdir(tmp_path / "ds" / "epoch_0_step_2.discriminator")
    assert read_log(tmp_path / "ds")[0]["lr"] == pytest.approx(2e-3)  # the recipe's, not the json's



def test_the_gan_fine_tunes_from_a_released_hift_file(gan_run, training_list, cv_list, qwen_dir, gan_recipe, tmp_path):
    """A released-layout hift.pt (weight_g/weight_v, no discriminator) starts a run: the generator
    from the file, weight norm trained as g and v, a fresh discriminator and optimizers."""
    released = tmp_path / "hift.pt"
    average_checkpoints(str(gan_run[0]), str(released), num=1)
    out = tmp_path / "finetune"
    report = train(options(training_list, qwen_dir, out, model="hifigan", config=gan_recipe, max_steps=1,
                           cv_data=cv_list, checkpoint=str(released)))
    assert report.steps == 1 and not os.path.exists(out / "init.pt")
    before, _, _ = load_model_weights(str(released))
    after, _, _ = load_model_weights(report.final_checkpoint)
    assert set(after) == set(before)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.endswith(".weight_g") for k in moved) and any(k.endswith(".weight_v") for k in moved)
