"""``cosyvoice-pipeline`` subcommands of the Triton stage (registered by ``cosyvoice.cli``)."""

from __future__ import annotations

import argparse
import json
import sys


def _parse_sets(items: list[str]) -> dict[str, str]:
    from cosyvoice.triton.render import split_escaped

    values: dict[str, str] = {}
    for item in items:
        for pair in split_escaped(item, ","):
            parts = split_escaped(pair, ":")
            if len(parts) != 2 or not parts[0]:
                raise ValueError(f"--set {pair!r}: expected key:value (escape ':' and ',' with '\\')")
            values[parts[0]] = parts[1]
    return values


def _models(args) -> list[str]:
    from cosyvoice.triton.render import MODELS, REFERENCE_AUDIO_MODELS

    return [m for m in MODELS if not (args.spk2info_only and m in REFERENCE_AUDIO_MODELS)]


def cmd_triton_repo(args: argparse.Namespace) -> int:
    from cosyvoice.triton.render import V1_MODELS, render_repo, repo_values, repo_values_v1
    from cosyvoice.triton.runtime_v1 import model_family
    from cosyvoice.triton.validate import validate_repo

    if model_family(args.model_dir) == "cosyvoice":  # CosyVoice1: TransformerLM on the python backend, no engine
        values = repo_values_v1(model_dir=args.model_dir, decoupled=args.decoupled, max_batch_size=args.max_batch_size,
                                bls_instances=args.bls_instances, overrides=_parse_sets(args.set))
        report = render_repo(args.out, values, models=V1_MODELS)
    else:
        missing = [f"--{k}" for k in ("engine_dir", "hf_dir") if not getattr(args, k)]
        if missing:
            raise ValueError(f"triton-repo for a CosyVoice2/3 model dir needs {', '.join(missing)} (a CosyVoice1 dir, "
                             "with cosyvoice.yaml building TransformerLM, needs neither)")
        values = repo_values(engine_dir=args.engine_dir, hf_dir=args.hf_dir, model_dir=args.model_dir,
                             decoupled=args.decoupled, max_batch_size=args.max_batch_size,
                             bls_instances=args.bls_instances, overrides=_parse_sets(args.set))
        report = render_repo(args.out, values, models=_models(args), llm_backend=args.llm_backend)
    print(report.summary())
    for model, dropped in report.dropped_optional.items():
        if dropped:
            print(f"  {model}: {len(dropped)} optional parameter(s) left out (model default)", file=sys.stderr)
    for model, unset in report.unset_parameters.items():
        if unset:
            print(f"  {model}: {len(unset)} parameter(s) written as unset \"${{key}}\" (backend default)",
                  file=sys.stderr)
    if args.no_validate:
        return 0
    validation = validate_repo(args.out, require_reference_models=not args.spk2info_only)
    print(validation.summary())
    return 0 if validation.ok else 1


def cmd_fill_template(args: argparse.Namespace) -> int:
    from cosyvoice.triton.render import fill_template

    with open(args.file_path, encoding="utf-8") as f:
        text = fill_template(f.read(), args.substitutions, where=args.file_path)
    if args.in_place:
        with open(args.file_path, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_triton_validate(args: argparse.Namespace) -> int:
    from cosyvoice.triton.validate import validate_repo

    report = validate_repo(args.repo, base_dir=args.base_dir, require_reference_models=not args.spk2info_only)
    print(report.summary())
    return 0 if report.ok else 1


def cmd_triton_publish(args: argparse.Namespace) -> int:
    from cosyvoice.triton import publish

    if args.rollback:
        before, now = publish.rollback(args.root, to=args.to, channel=args.channel)
        print(f"{args.root}: {publish.CHANNELS[args.channel]} {before} -> {now}")
        return 0
    from cosyvoice.triton.runtime_v1 import model_family

    v1 = bool(args.model_dir) and model_family(args.model_dir) == "cosyvoice"  # no engine or HF export
    missing = [f"--{k}" for k in (("model_dir",) if v1 else ("engine_dir", "hf_dir", "model_dir")) if not getattr(args, k)]
    if missing:
        raise ValueError(f"triton-publish needs {', '.join(missing)} (or --rollback)")
    if v1:
        args.llm_backend = "python"  # a TransformerLM is served by the python backend: the cpu channel
    report = publish.publish_triton_repo(
        args.root, engine_dir=args.engine_dir, hf_dir=args.hf_dir, model_dir=args.model_dir, spk2info=args.spk2info,
        mount=args.mount, load_test=args.load_test, decoupled=args.decoupled, max_batch_size=args.max_batch_size,
        bls_instances=args.bls_instances, overrides=_parse_sets(args.set), llm_backend=args.llm_backend)
    print(report.summary())
    return 0 if report.promoted else 1


def cmd_triton_pull(args: argparse.Namespace) -> int:
    from cosyvoice.triton.publish import pull

    version = pull(args.root, args.dest, version=args.version, channel=args.channel,
                   allow_undeployable=args.allow_undeployable)
    print(f"pulled version {version} of {args.root} (channel {args.channel}) into {args.dest}")
    return 0


def cmd_triton_spk2info(args: argparse.Namespace) -> int:
    from cosyvoice.triton.spk2info import build_spk2info

    report = build_spk2info(args.dir, args.model_dir, args.out, speakers=[s for s in args.speakers.split(",") if s])
    print(json.dumps(report.as_metadata(), indent=2))
    return 0


def cmd_triton_server_env(args: argparse.Namespace) -> int:
    from cosyvoice.triton.server import build_server_env

    env = build_server_env(args.dir)
    print(f"tritonserver: {env.tritonserver}\nbackends: {env.backends}\npython: {env.python_bin}")
    return 0


def _repo_flags(p: argparse.ArgumentParser, required: bool, *, v1: bool = False) -> None:
    engine_required = required and not v1
    p.add_argument("--engine_dir", required=engine_required, help="TensorRT-LLM engine dir (gpt_model_path)"
                   + ("; not for a CosyVoice1 model dir" if v1 else ""))
    p.add_argument("--hf_dir", required=engine_required, help="HF export of the LLM (the BLS tokenizer: llm_tokenizer_dir)"
                   + ("; not for a CosyVoice1 model dir" if v1 else ""))
    p.add_argument("--model_dir", required=required, help="CosyVoice2 model dir (campplus.onnx, speech_tokenizer_v2.onnx, "
                   "flow/hift, spk2info.pt)" + ("; a CosyVoice1 dir (cosyvoice.yaml with TransformerLM, llm.pt, "
                                                "flow.pt, hift.pt) renders the cosyvoice + transformer_llm repo" if v1 else ""))
    p.add_argument("--decoupled", action=argparse.BooleanOptionalAction, default=True,
                   help="streaming (decoupled) cosyvoice2 + tensorrt_llm (default) or offline")
    p.add_argument("--max_batch_size", type=int, default=16)
    p.add_argument("--bls_instances", type=int, default=4)
    p.add_argument("--set", action="append", default=[], metavar="KEY:VALUE[,KEY:VALUE]",
                   help="any other template variable (repeatable); unknown keys are an error")
    p.add_argument("--llm_backend", choices=("tensorrtllm", "python"), default="tensorrtllm",
                   help="python: serve the HF export with our python model behind the same tensorrt_llm interface (CPU)")


def add_subcommands(sub) -> None:
    from cosyvoice.stages import command_help

    p = sub.add_parser("triton-repo", help=command_help("triton-repo"))
    _repo_flags(p, required=True, v1=True)
    p.add_argument("--out", required=True, help="the model repository folder to write")
    p.add_argument("--spk2info_only", action="store_true",
                   help="leave out audio_tokenizer/speaker_embedding (requests use the spk2info.pt cache)")
    p.add_argument("--no_validate", action="store_true")
    p.set_defaults(func=cmd_triton_repo)

    p = sub.add_parser("fill-template", help=command_help("fill-template"))
    p.add_argument("file_path")
    p.add_argument("substitutions", help="key:value,key:value ('\\' escapes ',' and ':')")
    p.add_argument("-i", "--in_place", action="store_true")
    p.set_defaults(func=cmd_fill_template)

    p = sub.add_parser("triton-validate", help=command_help("triton-validate"))
    p.add_argument("repo")
    p.add_argument("--base_dir", default=None, help="where relative parameter paths resolve (tritonserver's cwd)")
    p.add_argument("--spk2info_only", action="store_true")
    p.set_defaults(func=cmd_triton_validate)

    p = sub.add_parser("triton-publish", help=command_help("triton-publish"))
    p.add_argument("--root", required=True, help="e.g. <data root>/triton/cosyvoice2 (path or s3:// URL)")
    p.add_argument("--rollback", action="store_true",
                   help="point the channel's pointer at its previous complete deployable version")
    p.add_argument("--to", type=int, default=None, help="with --rollback: this version instead")
    p.add_argument("--channel", choices=("gpu", "cpu"), default="gpu",
                   help="with --rollback: gpu (LATEST, TensorRT-LLM) or cpu (LATEST-cpu, python-backend fallback); "
                   "a publish takes its channel from --llm_backend")
    _repo_flags(p, required=False)
    p.add_argument("--spk2info", default=None, help="spk2info.pt to put into the model dir")
    p.add_argument("--mount", default="/models/cosyvoice2", help="where servers sync the version to")
    p.add_argument("--load_test", choices=("auto", "require", "skip"), default="auto",
                   help="auto: a version whose load test could not run here is uploaded but not promoted (exit 1); "
                   "require: then nothing is uploaded; skip: publish untested, on purpose")
    p.set_defaults(func=cmd_triton_publish)

    p = sub.add_parser("triton-pull", help=command_help("triton-pull"))
    p.add_argument("--root", required=True)
    p.add_argument("--dest", required=True)
    p.add_argument("--version", type=int, default=None, help="a version of --channel (default: its pointer)")
    p.add_argument("--channel", choices=("gpu", "cpu"), default="gpu",
                   help="gpu: LATEST (TensorRT-LLM); cpu: LATEST-cpu (HF LLM on the python backend)")
    p.add_argument("--allow_undeployable", action="store_true",
                   help="also pull a version that was never promoted (its load test did not run), for inspection")
    p.set_defaults(func=cmd_triton_pull)

    p = sub.add_parser("triton-spk2info", help=command_help("triton-spk2info"))
    p.add_argument("--dir", required=True, help="data dir (wav.scp, text, utt2spk)")
    p.add_argument("--model_dir", required=True, help="folder with campplus.onnx and speech_tokenizer_v2.onnx")
    p.add_argument("--out", required=True, help=".../spk2info.pt (path or URL)")
    p.add_argument("--speakers", required=True, help="comma-separated speaker ids; the first is also '001'")
    p.set_defaults(func=cmd_triton_spk2info)

    p = sub.add_parser("triton-server-env", help=command_help("triton-server-env"))
    p.add_argument("--dir", default=None, help="default: $COSYVOICE_TRITON_ENV or <venv>/triton-server")
    p.set_defaults(func=cmd_triton_server_env)
