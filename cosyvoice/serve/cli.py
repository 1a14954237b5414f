"""``cosyvoice-pipeline`` subcommands of the serving gateway (registered by ``cosyvoice.cli``).

Flags name the common settings; everything else (and the API token, a secret) comes from the
``COSYVOICE_GATEWAY_*`` environment (cosyvoice/serve/settings.py). Nothing heavy is imported until a
handler runs."""

from __future__ import annotations

import argparse


def _overrides(args: argparse.Namespace) -> dict:
    return {"triton": args.triton, "spk2info": args.spk2info, "redis_url": args.redis_url,
            "rate_limit": args.rate_limit, "model": args.model, "tokenizer_dir": args.tokenizer_dir}


def cmd_gateway(args: argparse.Namespace) -> int:
    from cosyvoice.serve.app import run_gateway

    run_gateway(host=args.host, port=args.port, workers=args.workers, log_level=args.log_level, **_overrides(args))
    return 0


def cmd_gateway_grpc(args: argparse.Namespace) -> int:
    import logging

    from cosyvoice.serve.grpc_server import serve

    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    serve(host=args.host, port=args.port, max_concurrent_rpcs=args.max_conc, metrics_port=args.metrics_port,
          **_overrides(args))
    return 0


def _common_flags(p: argparse.ArgumentParser) -> None:
    """The settings both frontends take as flags (over ``COSYVOICE_GATEWAY_*``)."""
    p.add_argument("--triton", default=None, metavar="HOST:GRPC_PORT[|http://HOST:HTTP_PORT],...",
                   help="Triton replicas (default: $COSYVOICE_GATEWAY_TRITON or 127.0.0.1:8001)")
    p.add_argument("--spk2info", default=None, help="the speaker registry file (default: $COSYVOICE_GATEWAY_SPK2INFO; "
                   "none: speakers registered in memory only)")
    p.add_argument("--redis_url", default=None, help="Redis for the prompt cache shared by workers (redis://host:6379/0)")
    p.add_argument("--rate_limit", type=float, default=None, help="requests per minute per client address (0: none)")
    p.add_argument("--model", choices=("cosyvoice2", "cosyvoice"), default=None,
                   help="the served model family (cosyvoice: a CosyVoice1 model, the only one with /inference_instruct)")
    p.add_argument("--tokenizer_dir", default=None, help="HF tokenizer for English segment lengths (the HF export)")
    p.add_argument("--log_level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def add_subcommands(sub) -> None:
    from cosyvoice.stages import command_help

    p = sub.add_parser("gateway", help=command_help("gateway"))
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (each its own Triton pool)")
    _common_flags(p)
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("gateway-grpc", help=command_help("gateway-grpc"))
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=50000, help="upstream's default port")
    p.add_argument("--max-conc", "--max_conc", dest="max_conc", type=int, default=16,
                   help="syntheses at once (upstream's --max_conc); more are refused with RESOURCE_EXHAUSTED")
    p.add_argument("--metrics-port", "--metrics_port", dest="metrics_port", type=int, default=None,
                   help="Prometheus /metrics over HTTP on this port (the gRPC frontend's own series)")
    _common_flags(p)
    p.set_defaults(func=cmd_gateway_grpc)
