"""``cosyvoice-pipeline``: one subcommand per stage, flags mirroring the upstream recipe tools.

Each subcommand is a thin face of one library function (same name, snake_case); heavy imports
happen inside the handlers so that e.g. ``prepare-libritts`` never pays for torch.
"""

from __future__ import annotations

import argparse
import os
import sys


def _progress(desc: str, total: int | None = None):
    from tqdm import tqdm

    def wrap(iterable):
        return tqdm(iterable, desc=desc, total=total, unit="utt", disable=not sys.stderr.isatty(), leave=False)

    return wrap


def cmd_prepare_libritts(args: argparse.Namespace) -> int:
    from cosyvoice.corpus.manifest import prepare_libritts
    from cosyvoice.corpus.scan import AudioPolicy

    report = prepare_libritts(
        args.src_dir, args.des_dir, instruct=args.instruct or None, utts_per_shard=args.utts_per_shard,
        num_workers=args.num_workers, subset=args.subset,
        policy=AudioPolicy(min_sample_rate=args.min_sample_rate, max_channels=args.max_channels),
        progress=_progress("checking audio"),
    )
    print(report.summary())
    for item in report.quarantined[: args.show_quarantined]:
        print(f"  {item}", file=sys.stderr)
    if len(report.quarantined) > args.show_quarantined:
        print(f"  ... {len(report.quarantined) - args.show_quarantined} more in quarantine.tsv", file=sys.stderr)
    return 0


def cmd_make_synthetic_corpus(args: argparse.Namespace) -> int:
    from cosyvoice.corpus.synthetic import make_synthetic_corpus

    report = make_synthetic_corpus(
        args.out, subsets=[s for s in args.subsets.split(",") if s], speakers=args.speakers,
        utts_per_speaker=args.utts_per_speaker, seed=args.seed, with_broken=args.with_broken,
        num_workers=args.num_workers, synthesiser=args.synthesiser,
    )
    print(f"wrote {report.utterances} utterances ({report.audio_seconds / 60:.1f} min, {report.synthesiser})"
          + (f" + {report.broken} broken files" if report.broken else "") + f" to {report.out}")
    return 0


def cmd_make_reference_models(args: argparse.Namespace) -> int:
    from cosyvoice.features.reference_models import make_reference_models

    report = make_reference_models(args.out, seed=args.seed, size=args.size,
                                   models=[m for m in args.models.split(",") if m], force=args.force)
    for name, info in report.items():
        print(f"{name}: {info['status']} ({info['bytes'] / 1e6:.1f} MB, sha256 {info['sha256'][:12]})")
    return 0


def _print_extraction(report) -> None:
    meta = report.as_metadata()
    print(f"{report.kind}: {meta['utterances']} of {report.requested} utterances, {meta['audio_hours']:.3f} h of audio "
          f"in {meta['wall_seconds']:.1f} s ({meta['throughput_audio_s_per_s']:.1f} s of audio per second)")
    if report.kind == "speech_token" and (report.long_skipped or report.long_chunked):
        print(f"long audio (> 30 s): {len(report.long_skipped)} written as [] , {len(report.long_chunked)} chunked")
    if report.agreement is not None:
        print(f"{report.precision} tokens equal to fp32: {100 * report.agreement:.2f} % "
              f"(sample of {report.agreement_utterances} utterances)")
    for failure in report.failures:
        print(f"  failed: {failure}", file=sys.stderr)
    if report.failures_url:
        print(f"{len(report.failures)} failed utterance(s) listed in {report.failures_url}")


def cmd_extract_embedding(args: argparse.Namespace) -> int:
    from cosyvoice.features.stages import extract_embedding

    report = extract_embedding(args.dir, args.onnx_path, num_thread=args.num_thread, shard=args.shard,
                               progress=_progress("embeddings"))
    _print_extraction(report)
    return 0


def cmd_extract_speech_token(args: argparse.Namespace) -> int:
    from cosyvoice.features.stages import extract_speech_token

    report = extract_speech_token(args.dir, args.onnx_path, num_thread=args.num_thread, device=args.device,
                                  long_audio=args.long_audio, shard=args.shard, progress=_progress("tokens"),
                                  batch_size=args.batch_size, runtime=args.runtime or
                                  ("torch" if args.precision != "fp32" else "onnxruntime"),
                                  precision=args.precision, agreement_sample=args.agreement_sample)
    _print_extraction(report)
    return 0


def cmd_make_parquet(args: argparse.Namespace) -> int:
    from cosyvoice.shards.make_parquet import make_parquet

    report = make_parquet(args.src_dir, args.des_dir, num_utts_per_parquet=args.num_utts_per_parquet,
                          num_processes=args.num_processes, dpo=args.dpo)
    print(report.summary())
    for problem in report.skipped:
        print(f"  skipped ({problem.stage}): {problem}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cosyvoice-pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-libritts", help="kaldi data dir + shard plan + quarantine for one LibriTTS subset")
    p.add_argument("--src_dir", required=True, help="one subset folder, e.g. LibriTTS/dev-clean (path or s3:// URL)")
    p.add_argument("--des_dir", required=True, help="output folder (path or s3:// URL)")
    p.add_argument("--instruct", default="", help="instruction written for every utterance (CosyVoice3)")
    p.add_argument("--num_workers", type=int, default=8, help="parallel header checks")
    p.add_argument("--utts_per_shard", type=int, default=1000)
    p.add_argument("--subset", default=None, help="shard key prefix (default: the src_dir folder name)")
    p.add_argument("--min_sample_rate", type=int, default=16000)
    p.add_argument("--max_channels", type=int, default=1)
    p.add_argument("--show_quarantined", type=int, default=20, help="how many quarantine entries to print")
    p.set_defaults(func=cmd_prepare_libritts)

    p = sub.add_parser("extract-embedding", help="CAM++ speaker embeddings (drop-in for tools/extract_embedding.py)")
    p.add_argument("--dir", required=True, help="data dir with wav.scp and utt2spk")
    p.add_argument("--onnx_path", required=True, help="campplus.onnx")
    p.add_argument("--num_thread", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--shard", default=None, help="only this shard of shards.json; writes below DIR/shards/KEY/")
    p.set_defaults(func=cmd_extract_embedding)

    p = sub.add_parser("extract-speech-token", help="S3 speech tokens (drop-in for tools/extract_speech_token.py)")
    p.add_argument("--dir", required=True, help="data dir with wav.scp")
    p.add_argument("--onnx_path", required=True, help="speech_tokenizer_v1/v2/v3.onnx")
    p.add_argument("--num_thread", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch_size", type=int, default=1,
                   help="length-sorted padded batches (onnxruntime needs a batch-capable model, e.g. "
                        "speech_tokenizer_v2.batch.onnx; the torch runtime batches any tokenizer file)")
    p.add_argument("--runtime", choices=("onnxruntime", "torch"), default=None,
                   help="onnxruntime (default, as upstream) or the torch module built from the same .onnx "
                        "(log-mel on the device; needed for bf16)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 (torch runtime) is faster on GPUs but flips a few %% of tokens; "
                        "the agreement with fp32 is measured and printed")
    p.add_argument("--agreement_sample", type=int, default=64,
                   help="utterances also run in fp32 to measure the bf16 agreement")
    p.add_argument("--long_audio", choices=("skip", "chunk"), default="skip",
                   help="audio > 30 s: skip (write [], as upstream) or tokenize consecutive <= 30 s windows")
    p.add_argument("--shard", default=None, help="only this shard of shards.json; writes below DIR/shards/KEY/")
    p.set_defaults(func=cmd_extract_speech_token)

    p = sub.add_parser("make-parquet", help="parquet training shards (drop-in for tools/make_parquet_list.py)")
    p.add_argument("--src_dir", required=True, help="data dir (wav.scp, text, utt2spk [, instruct, *.pt])")
    p.add_argument("--des_dir", required=True)
    p.add_argument("--num_utts_per_parquet", type=int, default=1000)
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--dpo", action="store_true", help="add reject_speech_token from <src_dir>_reject/utt2speech_token.pt")
    p.set_defaults(func=cmd_make_parquet)

    p = sub.add_parser("make-synthetic-corpus", help="a deterministic LibriTTS-shaped corpus")
    p.add_argument("--out", required=True)
    p.add_argument("--subsets", default="dev-clean")
    p.add_argument("--speakers", type=int, default=4)
    p.add_argument("--utts-per-speaker", dest="utts_per_speaker", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--with-broken", dest="with_broken", action="store_true")
    p.add_argument("--num-workers", dest="num_workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--synthesiser", choices=("auto", "espeak", "formant"), default="auto")
    p.set_defaults(func=cmd_make_synthetic_corpus)

    p = sub.add_parser("make-reference-models", help="seeded random-weight ONNX models with the upstream signatures")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=("full", "tiny"), default="full",
                   help="full: the released architectures; tiny: same signatures, few layers (fast tests)")
    p.add_argument("--models", default="campplus,speech_tokenizer_v1,speech_tokenizer_v2,speech_tokenizer_v2.batch")
    p.add_argument("--force", action="store_true", help="rebuild even if identical models are present")
    p.set_defaults(func=cmd_make_reference_models)

    from cosyvoice.train.cli import add_subcommands as add_training

    add_training(sub)
    __import__("cosyvoice.export.cli", fromlist=["add_subcommands"]).add_subcommands(sub)
    __import__("cosyvoice.triton.cli", fromlist=["add_subcommands"]).add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
