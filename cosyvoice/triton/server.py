"""Run a real ``tritonserver`` (with the python backend) on this machine, CPU only.

The server binary, python backend and per-Python-version backend stubs come from the PyPI wheel
``nvidia-pytriton`` (Triton 2.51). Three facts shape the set-up (measured):

* the stub must be a *symlink* in the backend directory (its ``$ORIGIN`` RPATH finds the bundled
  CUDA runtime next to the original);
* the stub embeds the ``python3`` it finds first on ``PATH`` (``sys.prefix`` = that environment)
  and ignores ``PYTHONPATH``; it links ``libpython3.X.so.1.0``, which must be the same build as
  that interpreter (we put the interpreter's own ``LIBDIR`` on ``LD_LIBRARY_PATH``);
* the stub's tensor code needs numpy 1.x (with numpy 2 every response tensor comes back empty).

So the server gets its own small environment: a venv of the same base interpreter holding
``numpy==1.26.4`` and the ``nvidia-pytriton`` files (installed without its dependencies), whose
``site-packages`` then chains to the project's environment for everything else (torch,
onnxruntime, transformers, this package). Its numpy shadows the project's.

Building it installs packages, so only an explicit command does that: ``make triton-server``
(``cosyvoice-pipeline triton-server-env`` -> ``build_server_env``) or the test set-up. Library
code (starting a server, ``publish``) only looks it up with ``server_env``, which raises
``ServerEnvMissing`` saying to run ``make triton-server``; it never runs ``pip`` or ``apt-get``.

A server runs in its own session (process group) with everything it starts, notably the python
backend stubs, which ignore SIGTERM; ``stop_process_group`` stops the whole group (SIGTERM, a grace
period, then SIGKILL) and waits until every member is gone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import psutil

PYTRITON = "nvidia-pytriton==0.7.0"
SERVER_NUMPY = "numpy==1.26.4"
_STAMP = "cosyvoice-triton-env.json"


@dataclass(frozen=True)
class ServerEnv:
    root: str
    python_bin: str  # the venv's bin/ (first on PATH for the stub)
    tritonserver: str
    backends: str
    lib_dirs: tuple[str, ...]


def default_env_dir() -> str:
    return os.environ.get("COSYVOICE_TRITON_ENV") or os.path.join(sys.prefix, "triton-server")


def _pyver() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _env_from(root: str) -> ServerEnv:
    site = os.path.join(root, "lib", f"python{_pyver()}", "site-packages")
    tree = os.path.join(site, "pytriton", "tritonserver")
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    return ServerEnv(root=root, python_bin=os.path.join(root, "bin"), tritonserver=os.path.join(tree, "bin", "tritonserver"),
                     backends=os.path.join(root, "backends"), lib_dirs=(libdir,) if libdir else ())


class ServerEnvMissing(RuntimeError):
    """The tritonserver environment is not built (or is stale): run ``make triton-server``."""


def _wanted() -> dict:
    return {"pytriton": PYTRITON, "numpy": SERVER_NUMPY, "python": sys.version.split()[0],
            "project_site": sysconfig.get_paths()["purelib"]}


def _require_libpython(env: ServerEnv, note: str = "") -> None:
    """The stub links ``libpython3.X.so.1.0``: it must be in the interpreter's LIBDIR or on the system
    library path (Debian: package ``libpython3.X``). Raises ``ServerEnvMissing`` with the command
    that installs it (and ``note``) when it is in neither."""
    soname = sysconfig.get_config_var("INSTSONAME") or f"libpython{_pyver()}.so.1.0"
    if any(os.path.exists(os.path.join(d, soname)) for d in env.lib_dirs):
        return
    listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    if soname not in listing:
        raise ServerEnvMissing(f"the python backend stub needs {soname}: run  sudo apt-get install -y libpython{_pyver()}"
                               + note)


def server_env(root: str | None = None) -> ServerEnv:
    """The built tritonserver environment under ``root``. Installs nothing: raises
    ``ServerEnvMissing`` (saying what to run) when it is missing, stale or incomplete."""
    root = os.path.abspath(root or default_env_dir())
    env = _env_from(root)
    stamp = os.path.join(root, _STAMP)
    how = (f"build it with  make triton-server  (or  cosyvoice-pipeline triton-server-env --dir {root})")
    if not (os.path.exists(stamp) and os.path.exists(env.tritonserver)):
        raise ServerEnvMissing(f"no tritonserver environment in {root}: {how}")
    with open(stamp) as f:
        built = json.load(f)
    if built != _wanted():
        raise ServerEnvMissing(f"the tritonserver environment in {root} was built for {built}, not {_wanted()}: {how}")
    _require_libpython(env)
    return env


def build_server_env(root: str | None = None, *, log=print) -> ServerEnv:
    """Build (once) and return the server environment under ``root``: the explicit step behind
    ``make triton-server`` and the test set-up. Idempotent: returns at once when already built.
    Runs ``pip`` (never ``apt-get``: a missing ``libpython3.X`` is reported with the command to run)."""
    root = os.path.abspath(root or default_env_dir())
    try:
        return server_env(root)
    except ServerEnvMissing:
        pass
    env = _env_from(root)
    _require_libpython(env, "  (make triton-server does this when run as root)")
    wanted = _wanted()
    stamp = os.path.join(root, _STAMP)
    base = getattr(sys, "_base_executable", sys.executable)
    log(f"building the tritonserver environment in {root} ({PYTRITON}, {SERVER_NUMPY})")
    if not os.path.exists(os.path.join(env.python_bin, "python")):
        subprocess.run([base, "-m", "venv", root], check=True)
    pip = [os.path.join(env.python_bin, "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + [SERVER_NUMPY], check=True)
    subprocess.run(pip + ["--no-deps", PYTRITON], check=True)
    site = os.path.join(root, "lib", f"python{_pyver()}", "site-packages")
    # a .pth line starting with "import" runs at start-up: chain to the project's environment,
    # after this venv's own site-packages (so numpy 1.26 wins), including its .pth/editable hooks
    with open(os.path.join(site, "zz_cosyvoice_project.pth"), "w") as f:
        f.write(f"import site; site.addsitedir({wanted['project_site']!r})\n")
    tree = os.path.dirname(os.path.dirname(env.tritonserver))
    python_backend = os.path.join(env.backends, "python")
    shutil.rmtree(env.backends, ignore_errors=True)
    os.makedirs(python_backend)
    for src in (os.path.join(tree, "backends", "python", "libtriton_python.so"),
                os.path.join(tree, "backends", "python", "triton_python_backend_utils.py"),
                os.path.join(tree, "python_backend_stubs", _pyver(), "triton_python_backend_stub")):
        if not os.path.exists(src):
            raise RuntimeError(f"{src} missing from {PYTRITON}: no python backend stub for Python {_pyver()}?")
        os.symlink(src, os.path.join(python_backend, os.path.basename(src)))
    with open(stamp + ".tmp", "w") as f:
        json.dump(wanted, f)
    os.replace(stamp + ".tmp", stamp)
    return server_env(root)


def _group_members(pgids: set[int], roots: list[int]) -> dict[int, psutil.Process]:
    """Live (non-zombie) processes in the process groups ``pgids`` plus the descendants of ``roots``
    (a descendant may have moved to a group of its own)."""
    found: dict[int, psutil.Process] = {}
    for pid in roots:
        try:
            root = psutil.Process(pid)
            found.update({p.pid: p for p in [root, *root.children(recursive=True)]})
        except psutil.Error:
            pass
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) in pgids:
                found[p.pid] = p
        except (OSError, psutil.Error):
            pass
    return {pid: p for pid, p in found.items() if _alive(p)}


def _signal_all(members: dict[int, psutil.Process], pgids: set[int], sig: int) -> None:
    for pgid in pgids:
        try:
            os.killpg(pgid, sig)
        except OSError:  # the group is already empty
            pass
    for p in members.values():  # descendants that left the group
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def stop_process_groups(procs, grace: float = 15.0, kill_wait: float = 10.0) -> None:
    """Stop processes started with ``start_new_session=True`` and everything they started.

    SIGTERM to each process group (and to descendants that left it), up to ``grace`` seconds for
    all of them to exit, then SIGKILL to whatever is left, and wait until every member is gone
    (zombies reaped by their parent or init count as gone); the ``Popen`` objects are reaped.
    Raises ``RuntimeError`` naming the processes when some survive SIGKILL."""
    procs = [p for p in procs if p is not None]
    pgids = {p.pid for p in procs}  # a session leader's pgid is its pid
    roots = [p.pid for p in procs if p.poll() is None]
    members = _group_members(pgids, roots)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, kill_wait)):
        _signal_all(members, pgids, sig)
        deadline = time.monotonic() + wait
        while True:
            for proc in procs:
                proc.poll()  # reap our own children
            members = {**members, **_group_members(pgids, [])}  # and new forks of the group
            members = {pid: p for pid, p in members.items() if _alive(p)}
            if not members or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        if not members:
            break
    for proc in procs:
        try:
            proc.wait(timeout=kill_wait)
        except subprocess.TimeoutExpired:
            members[proc.pid] = psutil.Process(proc.pid)
    if members:
        raise RuntimeError("processes survived SIGKILL: " + ", ".join(_describe(p) for p in members.values()))


def stop_process_group(proc: subprocess.Popen, grace: float = 15.0, kill_wait: float = 10.0) -> None:
    """``stop_process_groups`` for one process."""
    stop_process_groups([proc], grace=grace, kill_wait=kill_wait)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} ({' '.join(p.cmdline())[:120]})"
    except psutil.Error:
        return str(p.pid)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """One ``tritonserver`` on 127.0.0.1 with ports chosen at run time (or the given ``ports`` =
    (http, grpc): a replacement replica must come back where its clients look), in its own session;
    ``stop`` stops the server and its backend stubs (the process group)."""

    def __init__(self, repo: str, *, env: ServerEnv | None = None, explicit: bool = True, log_path: str | None = None,
                 cwd: str | None = None, extra_env: dict[str, str] | None = None,
                 ports: tuple[int, int] | None = None):
        self.repo = os.path.abspath(repo)
        self.env = env or server_env()
        self.explicit = explicit
        self.log_path = log_path or os.path.join(os.path.dirname(self.repo), "tritonserver.log")
        self.cwd = cwd
        self.extra_env = extra_env or {}
        self.ports = ports
        self.process: subprocess.Popen | None = None
        self.http_port = self.grpc_port = 0
        self.returncode: int | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 120.0, attempts: int | None = None) -> TritonServer:
        """Start on two free ports, retried on new ones when another process took one meanwhile; on
        fixed ``ports``, retried (every 0.5 s, 20 times by default) while a stopped server releases them."""
        attempts = attempts or (20 if self.ports else 3)
        for attempt in range(attempts):
            self.http_port, self.grpc_port = self.ports or (free_port(), free_port())
            mark = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
            if self._launch(timeout):
                return self
            with open(self.log_path, errors="replace") as f:
                f.seek(mark)
                clash = "already in use" in f.read()
            if not clash or attempt == attempts - 1:
                break
            if self.ports:
                time.sleep(0.5)
        raise RuntimeError(f"tritonserver exited with {self.returncode}:\n{self.log_tail()}")

    def _launch(self, timeout: float) -> bool:
        env = dict(os.environ, **self.extra_env)
        env["PATH"] = self.env.python_bin + os.pathsep + env.get("PATH", "")
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*self.env.lib_dirs, env.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
        env.pop("PYTHONPATH", None)
        cmd = [self.env.tritonserver, "--model-repository", self.repo, "--backend-directory", self.env.backends,
               "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
               "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port),
               "--allow-metrics", "false", "--disable-auto-complete-config", "--log-verbose", "0",
               "--exit-timeout-secs", "5"]
        if self.explicit:
            cmd += ["--model-control-mode", "explicit"]
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.returncode = self.process.returncode
                stop_process_group(self.process)  # whatever it started before exiting
                self._log.close()
                self.process = None
                return False
            if self._get("/v2/health/live") == 200:
                return True
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"tritonserver not live after {timeout:.0f} s:\n{self.log_tail()}")

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def ready(self) -> bool:
        return self._get("/v2/health/ready") == 200

    def load(self, *models: str) -> None:
        """Load models (explicit mode); the error carries the server log's reason."""
        import tritonclient.grpc as grpc

        client = grpc.InferenceServerClient(self.grpc_url)
        for model in models:
            try:
                client.load_model(model, client_timeout=600.0)
            except Exception as exc:
                raise RuntimeError(f"tritonserver could not load {model!r}: {exc}\n{self.log_tail()}") from exc

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 30.0) -> None:
        """Stop the server and every process it started (the python backend stubs ignore SIGTERM
        and outlive a server stopped by PID): the whole process group, SIGKILL after ``grace`` s."""
        if self.process is None:
            return
        try:
            stop_process_group(self.process, grace=grace)
        finally:
            self._log.close()
            self.process = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
