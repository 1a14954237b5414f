"""The session-end check: a process the test session started and left running fails the session
(and is stopped); the interpreter's own helpers (multiprocessing forkserver) do not."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LEAKY_TEST = textwrap.dedent('''
    import os, subprocess, sys, time

    IGNORES_SIGTERM = ("import os, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                       "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)")

    def test_starts_an_orphan_and_forgets_it():
        # like a backend stub outliving its server: own session, parent gone, ignores SIGTERM
        starter = "import subprocess, sys; subprocess.Popen(sys.argv[1:], start_new_session=True)"
        subprocess.run([sys.executable, "-c", starter, sys.executable, "-c", IGNORES_SIGTERM, {pid_file!r}], check=True)
        deadline = time.monotonic() + 60
        while not (os.path.exists({pid_file!r}) and open({pid_file!r}).read()) and time.monotonic() < deadline:
            time.sleep(0.05)
''')

CLEAN_TEST = textwrap.dedent('''
    import multiprocessing

    def test_uses_a_forkserver_pool():
        with multiprocessing.get_context("forkserver").Pool(1) as pool:
            assert pool.map(abs, [-1, -2]) == [1, 2]
''')


def _run_session(tmp_path, body: str) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_sessionfinish, pytest_sessionstart  # noqa: F401\n")
    (tmp_path / "test_inner.py").write_text(body)
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_process_left_running_fails_the_session_and_is_stopped(tmp_path):
    pid_file = str(tmp_path / "orphan.pid")
    result = _run_session(tmp_path, LEAKY_TEST.format(pid_file=pid_file))
    pid = int(open(pid_file).read())
    try:
        assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
        assert "1 passed" in result.stdout
        assert "1 process(es) started by the test session were still running" in result.stdout
        assert f"pid {pid} (parent " in result.stdout
        deadline = time.monotonic() + 10
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(pid)
    finally:
        if not _gone(pid):
            psutil.Process(pid).kill()


def test_a_session_that_stops_what_it_starts_passes(tmp_path):
    result = _run_session(tmp_path, CLEAN_TEST)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "still running" not in result.stdout
