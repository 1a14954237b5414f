"""Versioned, atomic publishing of a served model repository (local folder or S3).

Layout under ``<root>`` (e.g. ``<data root>/triton/cosyvoice2``)::

    <root>/1/...            a complete bundle: model_repo/ + the folders its parameters name
    <root>/1/manifest.json  written last: version, models, per-file bytes + sha256, validation
    <root>/2/...
    <root>/LATEST           "2": the version deployments pull

A version is uploaded under a new number, its manifest is written last, every file is read back
and checked against the manifest, and only then does ``LATEST`` switch (one atomic small-object
write). A reader that resolves ``LATEST`` therefore never sees a half-written version; a crashed
upload leaves an unreferenced number that the next publish skips. Rollback re-verifies an older
version and points ``LATEST`` at it.

The bundle (``build_bundle``) is self-contained: ``model_repo/`` rendered with parameter paths
under ``mount`` (where the pod/container syncs the version, default ``/models/cosyvoice2``),
``cosyvoice2_model/`` (the CosyVoice2 model dir + ``spk2info.pt``), ``cosyvoice2_llm/`` (HF export:
tokenizer for the BLS) and ``trt_engines/`` (TensorRT-LLM engine).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

from cosyvoice import storage
from cosyvoice.triton.render import MODELS, render_repo, repo_values
from cosyvoice.triton.validate import ValidationReport, validate_repo

MANIFEST = "manifest.json"
LATEST = "LATEST"
DEFAULT_MOUNT = "/models/cosyvoice2"
BUNDLE_DIRS = {"model_dir": "cosyvoice2_model", "hf_dir": "cosyvoice2_llm", "engine_dir": "trt_engines"}
_CHUNK = 8 << 20


class PublishError(RuntimeError):
    pass


# --- bundle ----------------------------------------------------------------------------------------

def _fetch_tree(src: str, dest: str) -> None:
    """Copy a folder (local path or URL) to a local folder."""
    if storage.is_local(src):
        path = storage.strip_protocol(src)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{src}: no such directory")
        shutil.copytree(path, dest, dirs_exist_ok=True)
        return
    root = storage.strip_protocol(src).rstrip("/")
    fs = storage.filesystem(src)
    for url, _ in storage.list_files(src):
        rel = storage.strip_protocol(url)[len(root) + 1:]
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(storage.strip_protocol(url), target)


@dataclass
class Bundle:
    path: str
    mount: str
    values: dict[str, str]
    validation: ValidationReport


def build_bundle(out: str, *, engine_dir: str, hf_dir: str, model_dir: str, mount: str = DEFAULT_MOUNT,
                 spk2info: str | None = None, decoupled: bool = True, max_batch_size: int = 16, bls_instances: int = 4,
                 overrides: dict[str, str] | None = None, models=MODELS, llm_backend: str = "tensorrtllm") -> Bundle:
    """Stage a self-contained bundle in local folder ``out`` and validate it (paths mapped from
    ``mount`` to ``out``). ``spk2info`` (a file URL) is copied into the model dir."""
    os.makedirs(out, exist_ok=True)
    sources = {"model_dir": model_dir, "hf_dir": hf_dir, "engine_dir": engine_dir}
    for key, folder in BUNDLE_DIRS.items():
        if key == "engine_dir" and llm_backend == "python":
            continue  # the HF export in cosyvoice2_llm/ is what the python LLM model serves
        _fetch_tree(sources[key], os.path.join(out, folder))
    if spk2info:
        with open(os.path.join(out, BUNDLE_DIRS["model_dir"], "spk2info.pt"), "wb") as f:
            f.write(storage.read_bytes(spk2info))
    served = {key: f"{mount.rstrip('/')}/{folder}" for key, folder in BUNDLE_DIRS.items()}
    values = repo_values(engine_dir=served["engine_dir"] if llm_backend == "tensorrtllm" else served["hf_dir"],
                         hf_dir=served["hf_dir"], model_dir=served["model_dir"], decoupled=decoupled,
                         max_batch_size=max_batch_size, bls_instances=bls_instances, overrides=overrides)
    if llm_backend == "python":
        values["triton_backend"] = "python"
    render_repo(os.path.join(out, "model_repo"), values, models=models, llm_backend=llm_backend)
    validation = validate_repo(os.path.join(out, "model_repo"), path_map={mount: out},
                               require_reference_models=set(models) >= {"audio_tokenizer", "speaker_embedding"})
    return Bundle(out, mount, values, validation)


def localize(bundle: Bundle, dest: str) -> str:
    """A copy of the bundle's ``model_repo`` whose parameter paths point into the local bundle
    (for a server load test on this machine); returns the repo folder."""
    mount = bundle.mount.rstrip("/")
    shutil.copytree(os.path.join(bundle.path, "model_repo"), dest)
    for model in os.listdir(dest):
        config = os.path.join(dest, model, "config.pbtxt")
        if os.path.isfile(config):
            with open(config, encoding="utf-8") as f:
                text = f.read()
            with open(config, "w", encoding="utf-8") as f:
                f.write(text.replace(f'"{mount}/', f'"{bundle.path.rstrip("/")}/'))
    return dest


# --- versions --------------------------------------------------------------------------------------

def _sha256_local(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _sha256_url(url: str) -> str:
    digest = hashlib.sha256()
    with storage.filesystem(url).open(storage.strip_protocol(url), "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _upload(local: str, url: str) -> None:
    if storage.is_local(url):
        staged = storage.staging_path(url)
        shutil.copyfile(local, staged)
        storage.publish(staged, url)
    else:
        storage.filesystem(url).put_file(local, storage.strip_protocol(url))


def versions(root: str) -> dict[int, bool]:
    """Every numbered version under ``root`` -> whether it has a manifest (is complete)."""
    found: dict[int, bool] = {}
    try:
        files = storage.list_files(root)
    except FileNotFoundError:
        return found
    base = storage.strip_protocol(root).rstrip("/")
    for url, _ in files:
        rel = storage.strip_protocol(url)[len(base) + 1:]
        head, _, rest = rel.partition("/")
        if head.isdigit() and rest:
            found[int(head)] = found.get(int(head), False) or rest == MANIFEST
    return found


def latest(root: str) -> int | None:
    url = storage.join(root, LATEST)
    if not storage.exists(url):
        return None
    text = storage.read_text(url).strip()
    if not text.isdigit():
        raise PublishError(f"{url}: {text!r} is not a version number")
    return int(text)


def read_manifest(root: str, version: int) -> dict:
    url = storage.join(root, str(version), MANIFEST)
    if not storage.exists(url):
        raise PublishError(f"{root}: version {version} has no {MANIFEST} (incomplete upload)")
    return json.loads(storage.read_text(url))


def verify_version(root: str, version: int) -> list[str]:
    """Problems of a stored version against its manifest (missing, extra, size or sha256 differing)."""
    manifest = read_manifest(root, version)
    prefix = storage.join(root, str(version))
    base = storage.strip_protocol(prefix).rstrip("/")
    stored = {storage.strip_protocol(u)[len(base) + 1:]: (u, size) for u, size in storage.list_files(prefix)}
    problems = []
    for rel, info in manifest["files"].items():
        if rel not in stored:
            problems.append(f"{rel}: missing")
            continue
        url, size = stored[rel]
        if size != info["bytes"]:
            problems.append(f"{rel}: {size} bytes, manifest says {info['bytes']}")
        elif _sha256_url(url) != info["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
    extra = sorted(set(stored) - set(manifest["files"]) - {MANIFEST})
    problems += [f"{rel}: not in the manifest" for rel in extra]
    return problems


@dataclass
class PublishReport:
    root: str
    version: int
    previous: int | None
    files: int
    bytes: int
    models: list[str]
    seconds: float
    manifest: dict = field(repr=False, default_factory=dict)

    def as_metadata(self) -> dict:
        return {"root": self.root, "version": self.version, "previous_version": self.previous,
                "manifest": storage.join(self.root, str(self.version), MANIFEST), "files": self.files,
                "bytes": self.bytes, "models": self.models, "publish_seconds": round(self.seconds, 2),
                "validation": self.manifest.get("validation", {}).get("valid"),
                "server_load_test": self.manifest.get("server_load_test")}

    def summary(self) -> str:
        return (f"published version {self.version} of {self.root} ({self.files} files, {self.bytes / 1e6:.1f} MB, "
                f"models {', '.join(self.models)}); LATEST {self.previous} -> {self.version}")


def publish_bundle(bundle_dir: str, root: str, *, info: dict | None = None) -> PublishReport:
    """Upload a local bundle as the next version of ``root``, verify it, then switch ``LATEST``."""
    started = time.monotonic()
    previous = latest(root)
    existing = versions(root)
    version = max([*existing, previous or 0]) + 1
    prefix = storage.join(root, str(version))
    files: dict[str, dict] = {}
    for folder, _, names in os.walk(bundle_dir):
        for name in sorted(names):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, bundle_dir).replace(os.sep, "/")
            if rel == MANIFEST:
                continue
            files[rel] = {"bytes": os.path.getsize(path), "sha256": _sha256_local(path)}
    repo = os.path.join(bundle_dir, "model_repo")
    models = sorted(m for m in os.listdir(repo) if os.path.isfile(os.path.join(repo, m, "config.pbtxt")))
    manifest = {"version": version, "created_unix": int(time.time()), "models": models,
                "model_bytes": {m: sum(v["bytes"] for k, v in files.items() if k.startswith(f"model_repo/{m}/"))
                                for m in models},
                "total_bytes": sum(v["bytes"] for v in files.values()), "files": files, **(info or {})}
    for rel in files:
        _upload(os.path.join(bundle_dir, rel), storage.join(prefix, *rel.split("/")))
    storage.write_text(storage.join(prefix, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    problems = verify_version(root, version)
    if problems:
        raise PublishError(f"{prefix}: upload does not match its manifest, LATEST left at {previous}: "
                           + "; ".join(problems[:10]))
    storage.write_text(storage.join(root, LATEST), f"{version}\n")
    return PublishReport(root=root, version=version, previous=previous, files=len(files),
                         bytes=manifest["total_bytes"], models=models, seconds=time.monotonic() - started,
                         manifest=manifest)


def rollback(root: str, *, to: int | None = None) -> tuple[int | None, int]:
    """Point ``LATEST`` at version ``to`` (default: the newest complete version below the current
    one) after re-verifying it; returns ``(previous, now)``."""
    current = latest(root)
    complete = sorted(v for v, done in versions(root).items() if done)
    if to is None:
        older = [v for v in complete if current is None or v < current]
        if not older:
            raise PublishError(f"{root}: no complete version older than {current} to roll back to")
        to = older[-1]
    elif to not in complete:
        raise PublishError(f"{root}: version {to} is not a complete version (have {complete})")
    problems = verify_version(root, to)
    if problems:
        raise PublishError(f"{root}: version {to} fails verification, LATEST left at {current}: " + "; ".join(problems[:10]))
    storage.write_text(storage.join(root, LATEST), f"{to}\n")
    return current, to


def pull(root: str, dest: str, *, version: int | None = None) -> int:
    """Download a verified version (default ``LATEST``) into local folder ``dest`` (replaced as a
    whole, via a sibling temporary folder); returns the version."""
    version = version if version is not None else latest(root)
    if version is None:
        raise PublishError(f"{root}: nothing published yet (no {LATEST})")
    manifest = read_manifest(root, version)
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".pull-", dir=parent)
    try:
        for rel, info in manifest["files"].items():
            target = os.path.join(tmp, *rel.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            url = storage.join(root, str(version), *rel.split("/"))
            if storage.is_local(url):
                shutil.copyfile(storage.strip_protocol(url), target)
            else:
                storage.filesystem(url).get_file(storage.strip_protocol(url), target)
            if _sha256_local(target) != info["sha256"]:
                raise PublishError(f"{url}: sha256 differs from the manifest of version {version}")
        if os.path.exists(dest):
            old = dest.rstrip("/") + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return version


# --- the stage -------------------------------------------------------------------------------------

def server_load_test(bundle: Bundle, work: str) -> dict:
    """Load the bundle's models in a real tritonserver (explicit mode) on this machine.

    Loaded: every python model whose runtime is importable here. Not tested (and said so):
    ``tensorrt_llm`` on the tensorrtllm backend (no TensorRT-LLM here) and ``token2wav`` when its
    acoustic runtime is not installed. A model that should load and does not fails the test."""
    from cosyvoice.triton import runtime
    from cosyvoice.triton.server import TritonServer

    repo = localize(bundle, os.path.join(work, "load_test_repo"))
    present = sorted(m for m in os.listdir(repo) if os.path.isfile(os.path.join(repo, m, "config.pbtxt")))
    not_tested: dict[str, str] = {}
    if bundle.values.get("triton_backend", "tensorrtllm") == "tensorrtllm" and "tensorrt_llm" in present:
        not_tested["tensorrt_llm"] = "tensorrtllm backend not available in the CPU tritonserver"
    if "token2wav" in present:
        spec = bundle.values.get("token2wav_runtime") or "cosyvoice.acoustic.token2wav:Token2Wav"
        try:
            runtime.load_object(spec)
        except (ImportError, AttributeError, ValueError) as exc:
            not_tested["token2wav"] = f"acoustic runtime {spec!r} not importable: {exc}"
    to_load = [m for m in present if m not in not_tested]
    started = time.monotonic()
    with TritonServer(repo, log_path=os.path.join(work, "tritonserver.log")) as server:
        server.load(*to_load)
        ready = server.ready()
    return {"passed": ready, "loaded": to_load, "not_tested": not_tested,
            "seconds": round(time.monotonic() - started, 1)}


def publish_triton_repo(root: str, *, engine_dir: str, hf_dir: str, model_dir: str, spk2info: str | None = None,
                        mount: str = DEFAULT_MOUNT, load_test: str = "auto", decoupled: bool = True,
                        max_batch_size: int = 16, bls_instances: int = 4, overrides: dict[str, str] | None = None,
                        llm_backend: str = "tensorrtllm") -> PublishReport:
    """Render + validate + (server load test) + publish a new version of ``root``.

    Blocking: the repository must be valid (schema and semantics), and with ``load_test`` "auto"
    (run when a tritonserver environment can be set up here) or "require", the load test must
    pass; "skip" records that it did not run. Nothing is published when a blocking check fails."""
    if load_test not in ("auto", "require", "skip"):
        raise ValueError(f"load_test must be auto, require or skip, got {load_test!r}")
    with tempfile.TemporaryDirectory(prefix="triton-publish-") as work:
        bundle = build_bundle(os.path.join(work, "bundle"), engine_dir=engine_dir, hf_dir=hf_dir, model_dir=model_dir,
                              mount=mount, spk2info=spk2info, decoupled=decoupled, max_batch_size=max_batch_size,
                              bls_instances=bls_instances, overrides=overrides, llm_backend=llm_backend)
        if not bundle.validation.ok:
            raise PublishError("model repository invalid, nothing published:\n" + bundle.validation.summary())
        load: dict = {"passed": None, "skipped": "load_test=skip"}
        if load_test != "skip":
            try:
                from cosyvoice.triton.server import server_env

                server_env()  # built by `make triton-server`; publish never installs anything
            except Exception as exc:  # ServerEnvMissing: it says to run `make triton-server`
                if load_test == "require":
                    raise PublishError(f"load_test=require but no tritonserver environment: {exc}") from exc
                load = {"passed": None, "skipped": f"no tritonserver environment: {exc}"}
            else:
                load = server_load_test(bundle, work)
                if not load["passed"]:
                    raise PublishError(f"server load test failed, nothing published: {load}")
        return publish_bundle(bundle.path, root, info={
            "mount": mount, "validation": bundle.validation.as_metadata(), "server_load_test": load,
            "values": bundle.values})
