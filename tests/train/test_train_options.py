"""``TrainOptions`` is the one spelling of the trainer's flags: its argv parses back to an equal object."""

import argparse
from dataclasses import fields

import pytest

from cosyvoice.cli import build_parser
from cosyvoice.train.cli import add_subcommands
from cosyvoice.train.options import BatchType, TrainEngine, TrainOptions

REQUIRED = dict(config="r.yaml", train_data="s3://b/train.data.list", cv_data="/d/cv list", model_dir="/m/run-1")


def parsed(argv: list[str]) -> TrainOptions:
    return TrainOptions.from_args(build_parser().parse_args(argv))


def every_field_set() -> TrainOptions:
    """Every field off its default (so a flag that is not written, or written wrongly, shows)."""
    return TrainOptions(**REQUIRED, model="llm", train_engine=TrainEngine.deepspeed, checkpoint="/m/epoch_0_whole.pt",
                        qwen_pretrain_path="/q", onnx_path="/onnx", tensorboard_dir="/m/run-1/tb", dist_backend="gloo",
                        num_workers=3, prefetch=8, pin_memory=True, use_amp=True, dpo=True, ref_model="/ref.pt",
                        timeout=120, deepspeed_config="configs/ds_stage2.json", save_states="model_only",
                        batch_type=BatchType.token, max_tokens_in_batch=4096, max_frames_in_batch=9000, pack=False,
                        max_epoch=3, max_steps=40, save_per_step=5, log_interval=2, accum_grad=4, dpo_beta=0.05,
                        seed=7, peak_flops=9.89e14, compile=True, attn_implementation="sdpa", allow_random_init=True,
                        skip_unreadable_shards=True)


def test_every_field_round_trips_through_the_real_parser():
    opts = every_field_set()
    assert all(getattr(opts, f.name) != f.default for f in fields(TrainOptions) if f.name != "model")
    assert parsed(opts.to_argv()) == opts
    packed = TrainOptions(**REQUIRED, pack=True)
    assert "--pack" in packed.to_argv() and parsed(packed.to_argv()) == packed


def test_defaults_round_trip_and_only_the_required_flags_are_written():
    opts = TrainOptions(**REQUIRED)
    assert opts.to_argv() == ["train", "--config", "r.yaml", "--train_data", "s3://b/train.data.list",
                              "--cv_data", "/d/cv list", "--model_dir", "/m/run-1", "--model", "llm"]
    assert parsed(opts.to_argv()) == opts


def test_every_option_is_a_flag_of_the_train_parser():
    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers())
    train = parser._subparsers._group_actions[0].choices["train"]
    assert {f.name for f in fields(TrainOptions)} <= {action.dest for action in train._actions}


def test_enum_fields_take_the_enum_or_its_value_and_refuse_anything_else():
    assert TrainOptions(**REQUIRED, train_engine=TrainEngine.deepspeed) == TrainOptions(**REQUIRED, train_engine="deepspeed")
    assert TrainOptions(**REQUIRED, batch_type=BatchType.token).batch_type == "token"
    with pytest.raises(ValueError, match="ddp"):
        TrainOptions(**REQUIRED, train_engine="ddp")
    with pytest.raises(ValueError, match="tokens"):
        TrainOptions(**REQUIRED, batch_type="tokens")
    with pytest.raises(ValueError, match="tensorboard_dir"):
        TrainOptions(**REQUIRED, tensorboard_dir=None).to_argv()
