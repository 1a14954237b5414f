"""Processes a test session started that are still alive when it ends (servers, backend stubs,
workers): the session-end check of ``tests/conftest.py``.

A process counts as started by the session when it descends from the pytest process, or when it
carries the session's cookie in its environment (``COSYVOICE_TEST_SESSION``, set at session start
and inherited by every child): that finds orphans too, e.g. a backend stub whose server exited and
which init adopted. The interpreter's own helpers, which end with it (the multiprocessing
forkserver and resource tracker, torch's compile workers), are not leftovers when pytest started
them directly.
"""

from __future__ import annotations

import os
import time
import uuid

import psutil

COOKIE_VAR = "COSYVOICE_TEST_SESSION"
_INTERPRETER_HELPERS = ("from multiprocessing.resource_tracker import main",
                        "from multiprocessing.forkserver import main",
                        "torch/_inductor/compile_worker")


def mark_session() -> str:
    """Set and return a new cookie, which every process started from here on inherits."""
    os.environ[COOKIE_VAR] = uuid.uuid4().hex
    return os.environ[COOKIE_VAR]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _interpreter_helper(p: psutil.Process, root_pid: int) -> bool:
    try:
        return p.ppid() == root_pid and any(h in " ".join(p.cmdline()) for h in _INTERPRETER_HELPERS)
    except psutil.Error:
        return False


def leftovers(cookie: str, root_pid: int | None = None) -> list[psutil.Process]:
    """Live processes started by the session of ``root_pid`` (default: this process) and ``cookie``."""
    root_pid = os.getpid() if root_pid is None else root_pid
    found: dict[int, psutil.Process] = {}
    try:
        found.update({p.pid: p for p in psutil.Process(root_pid).children(recursive=True)})
    except psutil.Error:
        pass
    for p in psutil.process_iter():
        if p.pid in (root_pid, os.getpid()) or p.pid in found:
            continue
        try:
            if p.environ().get(COOKIE_VAR) == cookie:
                found[p.pid] = p
        except psutil.Error:  # gone, or another user's
            pass
    return sorted((p for p in found.values() if _alive(p) and not _interpreter_helper(p, root_pid)),
                  key=lambda p: p.pid)


def describe(p: psutil.Process) -> str:
    try:
        with p.oneshot():
            rss = p.memory_info().rss / 2**20
            return f"pid {p.pid} (parent {p.ppid()}, {rss:.0f} MiB resident): {' '.join(p.cmdline())[:200]}"
    except psutil.Error:
        return f"pid {p.pid} (gone)"


def kill(processes: list[psutil.Process], grace: float = 3.0) -> list[psutil.Process]:
    """SIGTERM, then SIGKILL after ``grace`` s; returns those still alive (zombies count as gone)."""
    for sig in ("terminate", "kill"):
        for p in processes:
            try:
                getattr(p, sig)()
            except psutil.Error:
                pass
        deadline = time.monotonic() + grace
        while processes and time.monotonic() < deadline:
            time.sleep(0.1)
            processes = [p for p in processes if _alive(p)]
        if not processes:
            break
    return processes
