"""``cosyvoice-pipeline`` subcommands of the export stage: export-hf, import-hf, convert-checkpoint,
build-engine (flags as the upstream scripts; ``add_subcommands`` is called by ``cosyvoice.cli``)."""

from __future__ import annotations

import argparse


def cmd_export_hf(args: argparse.Namespace) -> int:
    from cosyvoice.export.hf import export_hf

    report = export_hf(args.llm_pt, args.out, tokenizer_dir=args.tokenizer_dir, config=args.config,
                       variant=args.variant, dtype=args.dtype)
    print(report.summary())
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from cosyvoice.export.hf import import_hf

    print(import_hf(args.hf_dir, args.out).summary())
    return 0


def cmd_convert_checkpoint(args: argparse.Namespace) -> int:
    from cosyvoice.export.trtllm import ConvertOptions
    from cosyvoice.export.variants import convert_variants

    opts = ConvertOptions(dtype=args.dtype, tp_size=args.tp_size, pp_size=args.pp_size, use_weight_only=args.use_weight_only,
                          weight_only_precision=args.weight_only_precision, smoothquant=args.smoothquant,
                          per_channel=args.per_channel, per_token=args.per_token, int8_kv_cache=args.int8_kv_cache)
    report = convert_variants(args.model_dir, args.output_dir, {"": opts}, calib_data=args.calib_data,
                              verify_data=args.verify_data, calib_size=args.calib_size, verify_size=args.verify_size,
                              max_len=args.calib_max_len)
    print(report.summary())
    return 0 if report.passed else 1


def cmd_build_engine(args: argparse.Namespace) -> int:
    from cosyvoice.export.engine import build_engine

    report = build_engine(args.checkpoint_dir, args.output_dir, max_batch_size=args.max_batch_size,
                          max_num_tokens=args.max_num_tokens, gemm_plugin=args.gemm_plugin, trtllm_build=args.trtllm_build)
    print(report.summary())
    return 0


def add_subcommands(sub) -> None:
    from cosyvoice.stages import command_help

    p = sub.add_parser("export-hf", help=command_help("export-hf"))
    p.add_argument("--llm_pt", required=True, help="CosyVoice2/3 llm.pt (path or s3:// URL)")
    p.add_argument("--config", default=None,
                   help="the Qwen2 body: recipe yaml, CosyVoice-BlankEN folder or its config.json (default: Qwen2-0.5B "
                        "when llm.pt has its shapes)")
    p.add_argument("--tokenizer_dir", required=True, help="Qwen2 tokenizer folder (CosyVoice-BlankEN)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--variant", choices=("cosyvoice2", "cosyvoice3"), default=None, help="default: from the state dict")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="auto keeps llm.pt's dtype (exact round trip); upstream writes bfloat16")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("import-hf", help=command_help("import-hf"))
    p.add_argument("--hf_dir", required=True)
    p.add_argument("--out", required=True, help="llm.pt to write")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("convert-checkpoint", help=command_help("convert-checkpoint"))
    p.add_argument("--model_dir", required=True, help="HF folder from export-hf")
    p.add_argument("--output_dir", default="tllm_checkpoint")
    p.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto")
    p.add_argument("--tp_size", type=int, default=1)
    p.add_argument("--pp_size", type=int, default=1)
    p.add_argument("--use_weight_only", action="store_true", help="W8A16/W4A16 (trtllm-build quantizes for its GPU)")
    p.add_argument("--weight_only_precision", choices=("int8", "int4"), default="int8")
    p.add_argument("--smoothquant", "-sq", type=float, default=None, help="SmoothQuant alpha in [0, 1]")
    p.add_argument("--per_channel", action="store_true")
    p.add_argument("--per_token", action="store_true")
    p.add_argument("--int8_kv_cache", action="store_true")
    p.add_argument("--calib_data", default=None, help="data.list of our parquet shards (SmoothQuant / int8 KV)")
    p.add_argument("--calib_size", type=int, default=64, help="calibration sequences")
    p.add_argument("--calib_max_len", type=int, default=512)
    p.add_argument("--verify_data", default=None, help="held-out data.list: verify the checkpoint with the reference forward")
    p.add_argument("--verify_size", type=int, default=16)
    p.set_defaults(func=cmd_convert_checkpoint)

    p = sub.add_parser("build-engine", help=command_help("build-engine"))
    p.add_argument("--checkpoint_dir", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--max_batch_size", type=int, default=16)
    p.add_argument("--max_num_tokens", type=int, default=32768)
    p.add_argument("--gemm_plugin", default="bfloat16")
    p.add_argument("--trtllm_build", default="trtllm-build", help="the trtllm-build executable")
    p.set_defaults(func=cmd_build_engine)
