"""``cosyvoice-pipeline train`` and ``average-checkpoints``: upstream ``train.py`` / ``average_model.py`` flags."""

from __future__ import annotations

import argparse
import json


def cmd_train(args: argparse.Namespace) -> int:
    from cosyvoice.train.options import TrainOptions
    from cosyvoice.train.trainer import train

    report = train(TrainOptions.from_args(args))
    print(json.dumps({"model_dir": report.model_dir, "steps": report.steps, "checkpoint": report.final_checkpoint,
                      "cv_loss": report.cv_loss, f"{report.unit}_per_s": round(report.throughput, 1),
                      "mfu": report.mfu, "dpo_skipped": report.dpo_skipped, "data_stats": report.data_stats}))
    return 0


def cmd_average_checkpoints(args: argparse.Namespace) -> int:
    from cosyvoice.train.checkpoint import average_checkpoints

    report = average_checkpoints(args.src_path, args.dst_model, num=args.num, val_best=args.val_best)
    for path, loss in zip(report.sources, report.losses):
        print(f"  {path}  cv loss {loss:.5f}")
    print(f"averaged {len(report.sources)} checkpoints -> {report.dst_model}")
    return 0


def add_subcommands(sub) -> None:
    """``train`` parses into ``TrainOptions`` (``TrainOptions.to_argv`` writes the same flags back;
    tests/train/test_train_options.py round-trips them through this parser)."""
    from cosyvoice.stages import command_help
    from cosyvoice.train.options import BatchType, TrainEngine

    p = sub.add_parser("train", help=command_help("train"))
    p.add_argument("--train_engine", default=TrainEngine.torch_ddp.value, choices=[e.value for e in TrainEngine])
    p.add_argument("--model", required=True, choices=["llm", "flow", "hifigan"],
                   help="llm, flow (flow matching) or hifigan (the HiFT vocoder with its discriminators)")
    p.add_argument("--config", required=True, help="recipe yaml: configs/cosyvoice2.yaml or an upstream recipe yaml")
    p.add_argument("--train_data", required=True)
    p.add_argument("--cv_data", required=True)
    p.add_argument("--model_dir", required=True)
    p.add_argument("--checkpoint", help="resume: epoch_*_step_*.pt / epoch_*_whole.pt (exact with its .state.pt)")
    p.add_argument("--qwen_pretrain_path", help="CosyVoice-BlankEN dir (tokenizer and Qwen2 weights)")
    p.add_argument("--onnx_path", help="dir with campplus.onnx and speech_tokenizer_v2(.batch).onnx: online features")
    p.add_argument("--tensorboard_dir", default="tensorboard")
    p.add_argument("--ddp.dist_backend", dest="dist_backend", default="nccl", choices=["nccl", "gloo"])
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--prefetch", type=int, default=100)
    p.add_argument("--pin_memory", action="store_true")
    p.add_argument("--use_amp", action="store_true", help="bf16 autocast (no GradScaler: bf16 needs none)")
    p.add_argument("--dpo", action="store_true")
    p.add_argument("--ref_model", help="DPO reference model .pt (loaded strictly)")
    p.add_argument("--timeout", type=int, default=60, help="seconds a rank may wait for the others at epoch end")
    p.add_argument("--deepspeed", action="store_true", help="accepted for compatibility (use --train_engine)")
    p.add_argument("--deepspeed_config", help="DeepSpeed json (configs/ds_stage2.json)")
    p.add_argument("--deepspeed.save_states", dest="save_states", default="model+optimizer",
                   choices=["model_only", "model+optimizer"])
    g = p.add_argument_group("cosyvoice-pipeline additions")
    g.add_argument("--batch_type", choices=[b.value for b in BatchType], help="override the recipe's batch type")
    g.add_argument("--max_tokens_in_batch", type=int, help="real LLM tokens per batch for --batch_type token")
    g.add_argument("--max_frames_in_batch", type=int)
    g.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                   help="packed sequences without padding (default: on with token batches)")
    g.add_argument("--max_epoch", type=int)
    g.add_argument("--max_steps", type=int, help="stop after this many optimizer steps (with a checkpoint)")
    g.add_argument("--save_per_step", type=int)
    g.add_argument("--log_interval", type=int)
    g.add_argument("--accum_grad", type=int)
    g.add_argument("--dpo_beta", type=float, default=0.01)
    g.add_argument("--seed", type=int, default=1986)
    g.add_argument("--peak_flops", type=float, help="per-device peak FLOP/s for MFU (GPUs are detected)")
    g.add_argument("--compile", action="store_true", help="torch.compile the Qwen2 body")
    g.add_argument("--skip_unreadable_shards", action="store_true",
                   help="a train/CV shard that cannot be read (after retries) is skipped, logged and counted "
                        "(unreadable_shards) instead of failing the epoch")
    g.add_argument("--allow_random_init", action="store_true",
                   help="train from a randomly initialised Qwen2 body when --qwen_pretrain_path holds no weights "
                        "(otherwise that stops the run; recipe key allow_random_init: true does the same)")
    g.add_argument("--attn_implementation", choices=["sdpa", "flash_attention_2", "flex_attention", "eager"],
                   help="attention kernel (default: flash_attention_2 for packed batches on GPU when installed, else sdpa)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("average-checkpoints", help=command_help("average-checkpoints"))
    p.add_argument("--src_path", required=True)
    p.add_argument("--dst_model", required=True)
    p.add_argument("--num", type=int, default=5)
    p.add_argument("--val_best", action=argparse.BooleanOptionalAction, default=True,
                   help="lowest CV losses (default); --no-val_best: the most recent")
    p.set_defaults(func=cmd_average_checkpoints)
