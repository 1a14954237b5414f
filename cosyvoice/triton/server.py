"""Run a real ``tritonserver`` (with the python backend) on this machine, CPU only.

The server binary, python backend and per-Python-version backend stubs come from the PyPI wheel
``nvidia-pytriton`` (Triton 2.51). Three facts shape the set-up (measured):

* the stub must be a *symlink* in the backend directory (its ``$ORIGIN`` RPATH finds the bundled
  CUDA runtime next to the original);
* the stub embeds the ``python3`` it finds first on ``PATH`` (``sys.prefix`` = that environment)
  and ignores ``PYTHONPATH``; it links ``libpython3.X.so.1.0``, which must be the same build as
  that interpreter (we put the interpreter's own ``LIBDIR`` on ``LD_LIBRARY_PATH``);
* the stub's tensor code needs numpy 1.x (with numpy 2 every response tensor comes back empty).

So the server gets its own small environment (``ensure_server_env``): a venv of the same base
interpreter holding ``numpy==1.26.4`` and the ``nvidia-pytriton`` files (installed without its
dependencies), whose ``site-packages`` then chains to the project's environment for everything
else (torch, onnxruntime, transformers, this package). Its numpy shadows the project's.
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


def _ensure_libpython(env: ServerEnv, log) -> None:
    """The stub links ``libpython3.X.so.1.0``: it must exist in the interpreter's LIBDIR or the system
    library path (Debian: package ``libpython3.X``, installed here when we run as root)."""
    soname = sysconfig.get_config_var("INSTSONAME") or f"libpython{_pyver()}.so.1.0"
    if any(os.path.exists(os.path.join(d, soname)) for d in env.lib_dirs):
        return
    listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    if soname in listing:
        return
    package = f"libpython{_pyver()}"
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log(f"installing {package} (the python backend stub links {soname})")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        return
    raise RuntimeError(f"the python backend stub needs {soname}: run  sudo apt-get install -y {package}")


def ensure_server_env(root: str | None = None, *, log=print) -> ServerEnv:
    """Build (once) and return the server environment under ``root``; idempotent and cached."""
    root = os.path.abspath(root or default_env_dir())
    env = _env_from(root)
    wanted = {"pytriton": PYTRITON, "numpy": SERVER_NUMPY, "python": sys.version.split()[0],
              "project_site": sysconfig.get_paths()["purelib"]}
    stamp = os.path.join(root, _STAMP)
    if os.path.exists(stamp) and os.path.exists(env.tritonserver):
        with open(stamp) as f:
            if json.load(f) == wanted:
                return env
    _ensure_libpython(env, log)
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
    with open(stamp, "w") as f:
        json.dump(wanted, f)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """One ``tritonserver`` process on 127.0.0.1 with ports chosen at run time, stopped by PID."""

    def __init__(self, repo: str, *, env: ServerEnv | None = None, explicit: bool = True, log_path: str | None = None,
                 cwd: str | None = None, extra_env: dict[str, str] | None = None):
        self.repo = os.path.abspath(repo)
        self.env = env or ensure_server_env()
        self.explicit = explicit
        self.log_path = log_path or os.path.join(os.path.dirname(self.repo), "tritonserver.log")
        self.cwd = cwd
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen | None = None
        self.http_port = self.grpc_port = 0
        self.returncode: int | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 120.0, attempts: int = 3) -> TritonServer:
        """Start on two free ports; retried on new ports when another process took one meanwhile."""
        for attempt in range(attempts):
            self.http_port, self.grpc_port = free_port(), free_port()
            mark = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
            if self._launch(timeout):
                return self
            with open(self.log_path, errors="replace") as f:
                f.seek(mark)
                clash = "already in use" in f.read()
            if not clash or attempt == attempts - 1:
                break
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

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the server and the stubs it spawned
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        self.process = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
