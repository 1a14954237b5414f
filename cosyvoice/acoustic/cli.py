"""``cosyvoice-pipeline synthesize``: the acoustic runtime's face on the command line (a quick listen)."""

from __future__ import annotations

import argparse
import sys


def _chunk_progress(iterable):
    from tqdm import tqdm

    return tqdm(iterable, desc="token2wav", unit="chunk", disable=not sys.stderr.isatty(), leave=False)


def cmd_synthesize(args: argparse.Namespace) -> int:
    from cosyvoice.acoustic.synthesis import synthesize

    report = synthesize(args.model_dir, args.out, tokens=args.tokens, utt=args.utt, text=args.text,
                        llm_dir=args.llm_dir, prompt_wav=args.prompt_wav, prompt_text=args.prompt_text,
                        stream=args.stream, seed=args.seed, chunk_causal_final=args.chunk_causal_final,
                        max_new_tokens=args.max_new_tokens, device=args.device, progress=_chunk_progress)
    for chunk in report.chunks:
        print(f"  chunk {chunk.index}: {chunk.samples / report.sample_rate:.2f} s of audio, "
              f"ready {chunk.ready_s:.3f} s after the start")
    print(report.summary())
    return 0


def add_subcommands(sub) -> None:
    from cosyvoice.stages import command_help

    p = sub.add_parser("synthesize", help=command_help("synthesize"))
    p.add_argument("--model_dir", required=True, help="CosyVoice2 model dir: flow.pt, hift.pt, cosyvoice2.yaml "
                   "(+ campplus.onnx, speech_tokenizer_v2.onnx for --prompt_wav)")
    p.add_argument("--out", required=True, help="the WAV to write (24 kHz float; path or s3:// URL)")
    p.add_argument("--tokens", default=None, help="speech-token ids: a text file of integers, a .npy, an "
                   "utt2speech_token.pt or a speech_tokens parquet shard (with --utt); or use --text")
    p.add_argument("--utt", default=None, help="the utterance of a .pt dict / parquet shard")
    p.add_argument("--text", default=None, help="text to speak: the LLM of --llm_dir samples its speech tokens")
    p.add_argument("--llm_dir", default=None, help="HF export of the CosyVoice2 LLM (export-hf), for --text")
    p.add_argument("--max_new_tokens", type=int, default=None, help="cap on the LLM's speech tokens (default 750)")
    p.add_argument("--prompt_wav", default=None, help="reference audio: its voice (tokens, mel, CAM++ embedding)")
    p.add_argument("--prompt_text", default=None, help="transcript of --prompt_wav (with --text)")
    p.add_argument("--stream", action="store_true", help="synthesize in upstream's streaming chunks and "
                   "print when each was ready")
    p.add_argument("--chunk_causal_final", action="store_true",
                   help="keep the final chunk chunk-causal too (a stream costs about one offline pass)")
    p.add_argument("--seed", type=int, default=0, help="LLM sampling and vocoder noise (same seed, same bytes)")
    p.add_argument("--device", default=None, help="token2wav's device: cpu, cuda, cuda:1 ... (default: cuda when available; "
                   "the LLM of --text runs on the CPU, as the Triton HF stand-in does)")
    p.set_defaults(func=cmd_synthesize)
