"""Stopping test tritonservers at once, and the shared memory that leaves behind.

``TritonServer.stop`` sends SIGTERM to the server's process group and waits up to its grace (30 s) for
every member. On SIGTERM the server waits ``--exit-timeout-secs`` (5 s) for its python models to unload,
which they do not finish in time, then exits; a backend stub it leaves behind lingers ~20 s more before it
notices. A stop took 7-25 s, for nothing a test looks at. ``stop_servers`` kills the servers' process
groups at once instead and removes what the killed stubs would have removed themselves: their /dev/shm
regions (named on each stub's command line; the only files a server leaves there).
"""

from __future__ import annotations

import contextlib
import os
import signal

import psutil

from cosyvoice.triton.server import TritonServer

SHM_PREFIX = "triton_python_backend_shm_region"


def shm_regions(server: TritonServer) -> list[str]:
    """The /dev/shm files of a running server's python backend stubs."""
    regions, children = set(), []
    with contextlib.suppress(psutil.Error):
        children = psutil.Process(server.process.pid).children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            regions.update(arg.lstrip("/") for arg in child.cmdline() if arg.lstrip("/").startswith(SHM_PREFIX))
    return sorted(os.path.join("/dev/shm", name) for name in regions)


def remove_files(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def stop_servers(servers: list[TritonServer]) -> None:
    """SIGKILL to every server's process group, each group reaped (``stop``), then the stubs' regions removed."""
    running = [s for s in servers if s.process is not None]
    regions = [path for server in running for path in shm_regions(server)]
    for server in running:
        with contextlib.suppress(OSError):
            os.killpg(server.process.pid, signal.SIGKILL)
    for server in running:
        server.stop(grace=1.0)
    remove_files(regions)  # every process that could use them is gone
