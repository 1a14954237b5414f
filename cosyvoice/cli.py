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
    from cosyvoice.corpus.manifest import prepare_libritts, subset_name
    from cosyvoice.corpus.parts import SubsetPart
    from cosyvoice.corpus.scan import AudioPolicy

    part = SubsetPart(args.subset or subset_name(args.src_dir), args.speaker_prefix) if args.speaker_prefix else None
    report = prepare_libritts(
        args.src_dir, args.des_dir, instruct=args.instruct or None, utts_per_shard=args.utts_per_shard,
        num_workers=args.num_workers, subset=part.key if part else args.subset, part=part,
        policy=AudioPolicy(min_sample_rate=args.min_sample_rate, max_channels=args.max_channels),
        progress=_progress("checking audio"), work_dir=args.work_dir,
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

    models = [m for m in args.models.split(",") if m] or None  # None: every model of the family's dir
    report = make_reference_models(args.out, seed=args.seed, size=args.size, models=models, force=args.force,
                                   family=args.family)
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
    from cosyvoice.features.options import EmbeddingOptions, options_from
    from cosyvoice.features.stages import extract_embedding

    report = extract_embedding(args.dir, args.onnx_path, options_from(EmbeddingOptions, args), shard=args.shard,
                               parquet=args.parquet, progress=_progress("embeddings"))
    _print_extraction(report)
    return 0


def cmd_extract_speech_token(args: argparse.Namespace) -> int:
    from cosyvoice.features.options import Precision, Runtime, SpeechTokenOptions, options_from
    from cosyvoice.features.stages import extract_speech_token

    if args.runtime is None:  # bf16 needs the torch runtime: choose it rather than fail
        args.runtime = Runtime.onnxruntime if args.precision is Precision.fp32 else Runtime.torch
    report = extract_speech_token(args.dir, args.onnx_path, options_from(SpeechTokenOptions, args),
                                  shard=args.shard, parquet=args.parquet, progress=_progress("tokens"))
    _print_extraction(report)
    return 0


def cmd_speaker_means(args: argparse.Namespace) -> int:
    from cosyvoice.features.stages import reduce_speaker_means

    report = reduce_speaker_means(_layout(args), args.subset)
    print(report.summary())
    return 0


def cmd_upstream_feature_files(args: argparse.Namespace) -> int:
    from cosyvoice.features.stages import export_upstream_features

    layout = _layout(args)
    for name, entries in export_upstream_features(layout, args.subset).items():
        print(f"{layout.manifest_dir(args.subset)}: {name} ({entries} entries)")
    return 0


def cmd_make_parquet(args: argparse.Namespace) -> int:
    from cosyvoice.shards.make_parquet import make_parquet

    report = make_parquet(args.src_dir, args.des_dir, num_utts_per_parquet=args.num_utts_per_parquet,
                          num_processes=args.num_processes, dpo=args.dpo, shard=args.shard)
    print(report.summary())
    for problem in report.skipped:
        print(f"  skipped ({problem.stage}): {problem}", file=sys.stderr)
    return 0


def cmd_training_data_lists(args: argparse.Namespace) -> int:
    from cosyvoice.shards.lists import make_data_lists

    subsets = {k: _names(getattr(args, k)) for k in ("train_subsets", "cv_subsets") if getattr(args, k) is not None}
    report = make_data_lists(_layout(args), **subsets)
    print(report.summary())
    return 0


def _names(text: str) -> list[str]:
    return [name for name in text.split(",") if name]


def _layout(args: argparse.Namespace):
    from cosyvoice.layout import DataLayout

    return DataLayout(args.data_root)


def _shard_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard", default=None, help="only this shard of shards.json; writes below DIR/shards/KEY/")
    p.add_argument("--parquet", default=None, help="write one parquet table here instead of .pt files "
                   "(the pipeline's per-shard form; failures in <name>.failed.tsv beside it)")


def _pipeline_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data_root", required=True, help="the pipeline's data root (path or s3:// URL), "
                   "laid out as cosyvoice/layout.py says")


def build_parser() -> argparse.ArgumentParser:
    from cosyvoice.features.options import EmbeddingOptions, SpeechTokenOptions, add_option_flags
    from cosyvoice.stages import command_help

    parser = argparse.ArgumentParser(prog="cosyvoice-pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-libritts", help=command_help("prepare-libritts"))
    p.add_argument("--src_dir", required=True, help="one subset folder, e.g. LibriTTS/dev-clean (path or s3:// URL)")
    p.add_argument("--des_dir", required=True, help="output folder (path or s3:// URL)")
    p.add_argument("--instruct", default="", help="instruction written for every utterance (CosyVoice3)")
    p.add_argument("--num_workers", type=int, default=8, help="parallel header checks")
    p.add_argument("--utts_per_shard", type=int, default=1000)
    p.add_argument("--subset", default=None, help="shard key prefix (default: the src_dir folder name)")
    p.add_argument("--speaker_prefix", default=None,
                   help="only the speaker folders starting with this: one part of a split subset, whose shard keys "
                        "are <subset>~<prefix>-NNNNNN (with COSYVOICE_SUBSET_PARTS set, every folder must belong to a part)")
    p.add_argument("--work_dir", default=None, help="local folder for the sorted runs (default: TMPDIR; "
                   "about 200 bytes per utterance)")
    p.add_argument("--min_sample_rate", type=int, default=16000)
    p.add_argument("--max_channels", type=int, default=1)
    p.add_argument("--show_quarantined", type=int, default=20, help="how many quarantine entries to print")
    p.set_defaults(func=cmd_prepare_libritts)

    p = sub.add_parser("extract-embedding", help=command_help("extract-embedding"))
    p.add_argument("--dir", required=True, help="data dir with wav.scp and utt2spk")
    p.add_argument("--onnx_path", required=True, help="campplus.onnx")
    add_option_flags(p, EmbeddingOptions, flags={"num_workers": "--num_thread"})
    _shard_flags(p)
    p.set_defaults(func=cmd_extract_embedding)

    p = sub.add_parser("extract-speech-token", help=command_help("extract-speech-token"))
    p.add_argument("--dir", required=True, help="data dir with wav.scp")
    p.add_argument("--onnx_path", required=True, help="speech_tokenizer_v1/v2/v3.onnx")
    add_option_flags(p, SpeechTokenOptions, flags={"num_workers": "--num_thread"},
                     defaults={"runtime": None})  # None: torch with --precision bf16, else onnxruntime
    _shard_flags(p)
    p.set_defaults(func=cmd_extract_speech_token)

    p = sub.add_parser("speaker-means", help=command_help("speaker-means"))
    _pipeline_flags(p)
    p.add_argument("--subset", required=True, help="e.g. dev-clean (its embedding shards must all exist)")
    p.set_defaults(func=cmd_speaker_means)

    p = sub.add_parser("upstream-feature-files", help=command_help("upstream-feature-files"))
    _pipeline_flags(p)
    p.add_argument("--subset", required=True, help="e.g. dev-clean: the .pt files go into its manifest dir")
    p.set_defaults(func=cmd_upstream_feature_files)

    p = sub.add_parser("make-parquet", help=command_help("make-parquet"))
    p.add_argument("--src_dir", required=True, help="data dir (wav.scp, text, utt2spk [, instruct, *.pt])")
    p.add_argument("--des_dir", required=True)
    p.add_argument("--num_utts_per_parquet", type=int, default=1000)
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--dpo", action="store_true", help="add reject_speech_token from <src_dir>_reject/utt2speech_token.pt")
    p.add_argument("--shard", default=None, help="only this shard of <src_dir>/shards.json: parquet_<index>.tar "
                   "and its .failed.tsv (no data.list)")
    p.set_defaults(func=cmd_make_parquet)

    p = sub.add_parser("training-data-lists", help=command_help("training-data-lists"))
    _pipeline_flags(p)
    p.add_argument("--train_subsets", default=None, help="comma-separated (default: every train-* subset)")
    p.add_argument("--cv_subsets", default=None, help="comma-separated (default: every dev-* subset)")
    p.set_defaults(func=cmd_training_data_lists)

    p = sub.add_parser("make-synthetic-corpus", help=command_help("make-synthetic-corpus"))
    p.add_argument("--out", required=True)
    p.add_argument("--subsets", default="dev-clean")
    p.add_argument("--speakers", type=int, default=4)
    p.add_argument("--utts-per-speaker", dest="utts_per_speaker", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--with-broken", dest="with_broken", action="store_true")
    p.add_argument("--num-workers", dest="num_workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--synthesiser", choices=("auto", "espeak", "formant"), default="auto")
    p.set_defaults(func=cmd_make_synthetic_corpus)

    p = sub.add_parser("make-reference-models", help=command_help("make-reference-models"))
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=("full", "tiny"), default="full",
                   help="full: the released architectures; tiny: same signatures, few layers (fast tests)")
    p.add_argument("--family", choices=("cosyvoice2", "cosyvoice1"), default="cosyvoice2",
                   help="cosyvoice2: the ONNX front-end models + the 24 kHz flow/hift (cosyvoice2.yaml); cosyvoice1: "
                        "a CosyVoice-300M dir (llm.pt, 22.05 kHz flow/hift, cosyvoice.yaml, spk2info.pt, its ONNX models)")
    p.add_argument("--models", default="",
                   help="comma-separated subset (default: every model of the family's dir); for cosyvoice2, "
                        "flow/hift also write the model dir's cosyvoice2.yaml")
    p.add_argument("--force", action="store_true", help="rebuild even if identical models are present")
    p.set_defaults(func=cmd_make_reference_models)

    from cosyvoice.train.cli import add_subcommands as add_training

    add_training(sub)
    __import__("cosyvoice.export.cli", fromlist=["add_subcommands"]).add_subcommands(sub)
    __import__("cosyvoice.triton.cli", fromlist=["add_subcommands"]).add_subcommands(sub)
    __import__("cosyvoice.serve.cli", fromlist=["add_subcommands"]).add_subcommands(sub)
    __import__("cosyvoice.acoustic.cli", fromlist=["add_subcommands"]).add_subcommands(sub)
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
