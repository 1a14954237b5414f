"""Stopping test tritonservers quickly, and the shared memory a killed one leaves behind.

``TritonServer.stop`` sends SIGTERM to the server's process group and waits up to its grace (30 s) for
every member. The server itself exits after ``--exit-timeout-secs`` (its python models do not finish
unloading in time), but a backend stub it leaves behind lingers ~20 s more before it notices, so a stop
took ~25 s. A test has nothing to wait for there: ``stop_servers`` stops several at once and kills the
stubs as soon as their server is gone.

A stub removes its /dev/shm region when it exits by itself; killed, it cannot, so whoever kills a
server or its stubs removes the regions (named on each stub's command line) afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

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


def stop_servers(servers: list[TritonServer], exit_timeout: float = 30.0) -> None:
    """SIGTERM to every server's process group at once; once a server has exited (or after
    ``exit_timeout``), ``stop`` kills what is left of its group, then the stubs' regions are removed."""
    running = [s for s in servers if s.process is not None]
    regions = [path for server in running for path in shm_regions(server)]
    for server in running:
        with contextlib.suppress(OSError):
            os.killpg(server.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + exit_timeout
    for server in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(timeout=max(0.1, deadline - time.monotonic()))
    for server in running:
        server.stop(grace=1.0)
    remove_files(regions)  # every process that could use them is gone
