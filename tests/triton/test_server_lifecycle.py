"""How servers are started and stopped, without a real tritonserver: the whole process group goes
(a backend stub that ignores SIGTERM included), and a missing server environment is an error that
names ``make triton-server`` instead of a ``pip``/``apt-get`` run inside a library call."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from cosyvoice.triton import server as triton_server
from cosyvoice.triton.server import ServerEnv, ServerEnvMissing, TritonServer, stop_process_group

# ignores SIGTERM, then writes its pid to the file named by its argument (so it is ready when seen)
IGNORES_SIGTERM = ("import os, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                   "open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid())); os.replace(sys.argv[1] + '.tmp', sys.argv[1]); "
                   "time.sleep(600)")

# Stands in for tritonserver: starts a "backend stub" that ignores SIGTERM (as the python backend's
# does), answers /v2/health/live, and exits on SIGTERM itself (the default action).
FAKE_TRITONSERVER = f"""#!{sys.executable}
import http.server, subprocess, sys
args = sys.argv[1:]
port = int(args[args.index("--http-port") + 1])
stub = subprocess.Popen([sys.executable, "-c", {IGNORES_SIGTERM!r}, sys.argv[0] + ".stub"])

class Live(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", port), Live).serve_forever()
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _fake_env(tmp_path) -> ServerEnv:
    binary = tmp_path / "tritonserver"
    binary.write_text(FAKE_TRITONSERVER)
    binary.chmod(0o755)
    return ServerEnv(root=str(tmp_path), python_bin=str(tmp_path), tritonserver=str(binary),
                     backends=str(tmp_path), lib_dirs=())


def test_stopping_the_server_stops_its_backend_stub_that_ignores_sigterm(tmp_path):
    env = _fake_env(tmp_path)
    (tmp_path / "repo").mkdir()
    srv = TritonServer(str(tmp_path / "repo"), env=env).start(timeout=60)
    server_pid = srv.process.pid
    stub_file = tmp_path / "tritonserver.stub"
    deadline = time.monotonic() + 30
    while not stub_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    stub_pid = int(stub_file.read_text())
    assert not _gone(stub_pid)
    started = time.monotonic()
    srv.stop(grace=1.0)
    assert _gone(server_pid) and _gone(stub_pid), "the backend stub outlived its server"
    assert srv.process is None and time.monotonic() - started < 20


def test_stop_process_group_kills_a_tree_whose_members_ignore_sigterm_or_left_the_group(tmp_path):
    """The leader exits on SIGTERM; one child ignores it; a grandchild started its own session
    (so a signal to the group misses it) and ignores SIGTERM too."""
    tree = textwrap.dedent(f"""
        import subprocess, sys, time
        code = {IGNORES_SIGTERM!r}
        subprocess.Popen([sys.executable, "-c", code, {str(tmp_path / "a")!r}])
        subprocess.Popen([sys.executable, "-c", code, {str(tmp_path / "b")!r}], start_new_session=True)
        time.sleep(600)
    """)
    leader = subprocess.Popen([sys.executable, "-c", tree], start_new_session=True)
    files = [tmp_path / "a", tmp_path / "b"]
    deadline = time.monotonic() + 30
    while not all(f.exists() for f in files) and time.monotonic() < deadline:
        time.sleep(0.05)
    children = [int(f.read_text()) for f in files]
    assert not any(_gone(p) for p in children)
    stop_process_group(leader, grace=0.5)
    assert leader.returncode is not None
    assert all(_gone(p) for p in [leader.pid, *children])


def test_a_missing_server_env_names_make_triton_server_and_installs_nothing(tmp_path, monkeypatch):
    calls = []
    real_run = subprocess.run

    def recording_run(cmd, *args, **kwargs):
        calls.append(cmd)
        if any(word in " ".join(map(str, cmd)) for word in ("pip", "apt-get", "venv")):
            raise AssertionError(f"a library call ran {cmd}")
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(triton_server.subprocess, "run", recording_run)
    monkeypatch.setenv("COSYVOICE_TRITON_ENV", str(tmp_path / "no-env"))
    (tmp_path / "repo").mkdir()
    with pytest.raises(ServerEnvMissing, match="make triton-server"):
        TritonServer(str(tmp_path / "repo"))
    with pytest.raises(ServerEnvMissing, match="make triton-server"):
        triton_server.server_env()
    assert not os.path.exists(tmp_path / "no-env")
    assert not [c for c in calls if c[0] != "ldconfig"]


def test_publish_without_a_server_env_installs_nothing_and_says_to_run_make_triton_server(
        tmp_path, monkeypatch, hf_dir, model_dir):
    from cosyvoice.triton import publish

    ran = []

    def refusing_run(cmd, *args, **kwargs):
        ran.append(cmd)
        raise AssertionError(f"publish ran {cmd}")

    monkeypatch.setenv("COSYVOICE_TRITON_ENV", str(tmp_path / "no-env"))
    real_run = subprocess.run
    monkeypatch.setattr(triton_server.subprocess, "run",
                        lambda cmd, *a, **k: real_run(cmd, *a, **k) if cmd[0] == "ldconfig" else refusing_run(cmd))
    with pytest.raises(publish.PublishError, match="make triton-server"):
        publish.publish_triton_repo(str(tmp_path / "root"), engine_dir=hf_dir, hf_dir=hf_dir, model_dir=model_dir,
                                    load_test="require", bls_instances=1, llm_backend="python")
    assert ran == [] and not os.path.exists(tmp_path / "no-env")
