"""A real Dagster deployment for tests: a gRPC code server (``dagster api grpc``, like a user-code
deployment on Kubernetes), ``dagster-webserver`` and ``dagster-daemon`` on 127.0.0.1 (free ports
chosen at run time) against a temporary DAGSTER_HOME. Every process runs in its own session and is
stopped with everything it started (``stop_process_groups``: SIGTERM, a grace period, SIGKILL, wait).
Webserver and daemon share the one code server, so the definitions are loaded once per stack.

A test that waits on backfills may ask for a faster backfill tick (``backfill_interval_s``): the daemon's
backfill loop sleeps dagster's ``DEFAULT_DAEMON_INTERVAL_SECONDS`` (30 s, no setting), so a backfill took
one to three 30 s ticks to start and finish. The daemon is then the same ``dagster-daemon run``, started by
a python line that sets that constant first."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cosyvoice.triton.server import stop_process_group, stop_process_groups

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

LAUNCH_BACKFILL = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
    ... on PartitionKeysNotFoundError { message }
    ... on InvalidSubsetError { message }
    ... on UnauthorizedError { message }
  }
}"""

BACKFILL_STATUS = """
query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { status numPartitions runs(limit: 200) { runId status tags { key value } } }
    ... on PythonError { message }
  }
}"""

#: ``dagster-daemon`` (its console script) with the backfill loop's interval set from argv[1] first
_DAEMON_WITH_BACKFILL_INTERVAL = (
    "import sys; import dagster._daemon.controller as controller; "
    "assert hasattr(controller, 'DEFAULT_DAEMON_INTERVAL_SECONDS'), 'dagster renamed the daemon interval'; "
    "controller.DEFAULT_DAEMON_INTERVAL_SECONDS = float(sys.argv.pop(1)); "
    "from dagster._daemon.cli import main; sys.argv[0] = 'dagster-daemon'; sys.exit(main())")

FINAL_BACKFILL_STATES = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED", "FAILING"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DagsterStack:
    def __init__(self, home: Path, env: dict[str, str], *, backfill_interval_s: float | None = None):
        self.home = Path(home)
        self.backfill_interval_s = backfill_interval_s
        self.env = {**os.environ, **env, "DAGSTER_HOME": str(self.home)}
        self.port = free_port()
        self.grpc_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def _spawn(self, name: str, args: list[str]) -> None:
        log = self.home / f"{name}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.procs.append(subprocess.Popen(args, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def start(self) -> "DagsterStack":
        workspace = str(self.home / "workspace.yaml")
        Path(workspace).write_text(f"load_from:\n  - grpc_server:\n      host: 127.0.0.1\n      port: {self.grpc_port}\n"
                                   f"      location_name: cosyvoice\n")
        self._spawn("code-server", [str(BIN / "dagster"), "api", "grpc", "-h", "127.0.0.1", "-p", str(self.grpc_port),
                                    "-m", "pipelines.definitions", "-d", str(REPO), "--location-name", "cosyvoice"])
        self._spawn("webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(self.port),
                                  "-w", workspace])
        daemon = ([sys.executable, "-c", _DAEMON_WITH_BACKFILL_INTERVAL, str(self.backfill_interval_s)]
                  if self.backfill_interval_s else [str(BIN / "dagster-daemon")])
        self._spawn("daemon", [*daemon, "run", "-w", workspace])
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for proc, log in zip(self.procs, self.logs):
                if proc.poll() is not None:
                    raise RuntimeError(f"{log.name} exited with {proc.returncode}:\n{self.tail(log)}")
            try:
                with urllib.request.urlopen(f"{self.url}/server_info", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            raise TimeoutError(f"webserver not answering on {self.url} after {timeout} s:\n{self.tail(self.logs[1])}")
        while time.time() < deadline:  # the code location is loaded when the repository query answers
            data = self.graphql("{ repositoriesOrError { ... on RepositoryConnection { nodes { name } } } }")
            if data["repositoriesOrError"].get("nodes"):
                return
            time.sleep(0.5)
        raise TimeoutError(f"code location not loaded after {timeout} s:\n{self.tail(self.logs[0])}")

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        if answer.get("errors"):
            raise RuntimeError(f"GraphQL errors: {answer['errors']}")
        return answer["data"]

    def launch_backfill(self, params: dict) -> str:
        result = self.graphql(LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
        if result["__typename"] != "LaunchBackfillSuccess":
            raise RuntimeError(f"launchPartitionBackfill: {result}")
        return result["backfillId"]

    def wait_backfill(self, backfill_id: str, timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.graphql(BACKFILL_STATUS, {"id": backfill_id})["partitionBackfillOrError"]
            if state.get("status") in FINAL_BACKFILL_STATES and all(
                    r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in state["runs"]):
                return state
            time.sleep(2)
        raise TimeoutError(f"backfill {backfill_id} not finished after {timeout} s: {state}\n"
                           f"{self.tail(self.logs[-1])}")

    def dagster(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.finish(self.dagster_async(*args), timeout=timeout)

    def dagster_async(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([str(BIN / "dagster"), *args], cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    @staticmethod
    def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process_group(proc, grace=5)  # the CLI and whatever it started
            raise
        stop_process_group(proc, grace=5)  # anything it left behind in its session
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    @staticmethod
    def tail(log: Path, n: int = 4000) -> str:
        return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"

    def stop(self, grace: float = 20) -> None:
        stop_process_groups(self.procs, grace=grace)


def stop_stacks(stacks, grace: float = 20) -> None:
    """Stop several stacks at once: one grace period for all their processes, not one per stack."""
    stop_process_groups([proc for stack in stacks for proc in stack.procs], grace=grace)
