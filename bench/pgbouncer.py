"""A PgBouncer in front of the bench's PostgreSQL: what the Kubernetes deployment runs next to the daemon.

dagster-postgres opens a new connection for every storage call outside the webserver (SQLAlchemy
``NullPool``), about 110 per backfill run. Against PostgreSQL each one forks a backend and does a
SCRAM-SHA-256 exchange (~12 ms here). PgBouncer in session mode keeps the server connections open
and answers the client's connect itself: with md5 between client and bouncer (the bouncer listens on
a private address only; it speaks SCRAM to PostgreSQL) a connect costs ~0.8 ms. Session mode, not
transaction mode, because the event-log watcher uses LISTEN/NOTIFY.

    with PgBouncer(host, port, user, password) as bouncer:
        ... connect to 127.0.0.1:bouncer.port ...

Needs the ``pgbouncer`` binary (Debian package ``pgbouncer``; ``.ci/postgres --with-pgbouncer`` installs it).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.pipelines.dagster_stack import free_port

BINARY_DIRS = ("/usr/sbin", "/usr/bin", "/usr/local/bin")


def pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or next(
        (str(Path(d) / "pgbouncer") for d in BINARY_DIRS if (Path(d) / "pgbouncer").exists()), None)
    if not found:
        raise SystemExit("--pgbouncer needs the pgbouncer binary: `sudo .ci/postgres --with-pgbouncer` "
                         "(Debian package pgbouncer)")
    return found


class PgBouncer:
    """PgBouncer on 127.0.0.1:<free port> forwarding every database to ``host:port`` (session pooling)."""

    def __init__(self, host: str, port: str | int, user: str, password: str, *, pool_size: int = 40):
        self.upstream = (host, int(port))
        self.user, self.password, self.pool_size = user, password, pool_size
        self.port = free_port()
        self._dir: Path | None = None
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> PgBouncer:
        self._dir = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
        ini, users, log = self._dir / "pgbouncer.ini", self._dir / "userlist.txt", self._dir / "pgbouncer.log"
        users.write_text(f'"{self.user}" "{self.password}"\n')
        host, port = self.upstream
        ini.write_text(
            "[databases]\n"
            f"* = host={host} port={port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = md5\nauth_file = {users}\n"
            f"pool_mode = session\nmax_client_conn = 4000\ndefault_pool_size = {self.pool_size}\n"
            f"logfile = {log}\nlog_connections = 0\nlog_disconnections = 0\n")
        command = [pgbouncer_binary(), str(ini)]
        if os.geteuid() == 0:  # it refuses to run as root: drop to an unprivileged account that can read its files
            account = next(name for name in ("postgres", "nobody") if _has_user(name))
            entry = pwd.getpwnam(account)
            for path in (self._dir, ini, users):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            os.chmod(users, 0o600)
            command[1:1] = ["-u", account]
        self._proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_ready(log)
        return self

    def _wait_ready(self, log: Path, timeout: float = 15) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                error = self._proc.stderr.read().decode(errors="replace")
                raise RuntimeError(f"pgbouncer exited with {self._proc.returncode}: {error or log.read_text()}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"pgbouncer did not listen on 127.0.0.1:{self.port} within {timeout} s")

    def __exit__(self, *exc) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)  # SIGINT: close the server connections and exit
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False
