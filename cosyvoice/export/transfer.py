"""Folder copy between storage URLs and a local folder, for the engine-build pod.

The TensorRT-LLM image has ``trtllm-build`` but not this package, so the build pod runs three steps
(``k8s/trtllm-engine-job.yaml``, and the ``trtllm_engine`` asset through Dagster Pipes): our image
``get``s the checkpoint into a shared volume, the TRT-LLM image builds, our image ``put``s the engine
folder back (checking it is complete) and, under Pipes, reports the materialization.

    python -m cosyvoice.export.transfer get s3://bucket/export/trtllm/bfloat16 /work/checkpoint
    python -m cosyvoice.export.transfer put /work/engine s3://bucket/export/engine/bfloat16 [--pipes]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cosyvoice.storage import download_dir, upload_dir


def get(url: str, dest: str) -> int:
    """Copy the folder at ``url`` into the local folder ``dest``; returns the bytes copied."""
    total = sum(download_dir(url, dest).values())
    if total == 0:
        raise FileNotFoundError(f"{url}: nothing to copy")
    return total


def check_engine_dir(folder: str) -> int:
    """Raise unless ``folder`` holds ``config.json`` and one ``rank{r}.engine`` per rank; returns the world size."""
    config = os.path.join(folder, "config.json")
    if not os.path.exists(config):
        raise FileNotFoundError(f"{folder}: no config.json - trtllm-build did not finish")
    with open(config) as f:
        world = json.load(f)["pretrained_config"]["mapping"]["world_size"]
    missing = [f"rank{r}.engine" for r in range(world) if not os.path.exists(os.path.join(folder, f"rank{r}.engine"))]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {missing}")
    return world


def put(folder: str, url: str, *, pipes: bool = False) -> dict[str, int]:
    world = check_engine_dir(folder)
    sizes = upload_dir(folder, url)
    if pipes:
        from dagster_pipes import open_dagster_pipes

        with open_dagster_pipes() as context:
            context.report_asset_materialization(metadata={
                "path": url, "engines": world, "bytes": sum(sizes.values()),
                "files": {"raw_value": sorted(sizes), "type": "json"}})
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cosyvoice.export.transfer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="op", required=True)
    p = sub.add_parser("get")
    p.add_argument("url")
    p.add_argument("dest")
    p = sub.add_parser("put")
    p.add_argument("folder")
    p.add_argument("url")
    p.add_argument("--pipes", action="store_true", help="report the materialization to Dagster (Pipes)")
    args = parser.parse_args(argv)
    try:
        if args.op == "get":
            print(f"copied {get(args.url, args.dest)} bytes from {args.url} to {args.dest}")
        else:
            print(f"published {len(put(args.folder, args.url, pipes=args.pipes))} files to {args.url}")
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
