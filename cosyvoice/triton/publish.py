"""Versioned, atomic publishing of a served model repository (local folder or S3).

Layout under ``<root>`` (e.g. ``<data root>/triton/cosyvoice2``)::

    <root>/1/...            a complete bundle: model_repo/ + the folders its parameters name
    <root>/1/manifest.json  written last: version, what it serves, load test, per-file bytes + sha256
    <root>/2/...
    <root>/LATEST           "2": the GPU (TensorRT-LLM) version deployments pull
    <root>/LATEST-cpu       "3": the CPU fallback (HF LLM on the python backend), a channel of its own

Channels: a version serving the LLM with the ``tensorrtllm`` backend belongs to channel ``gpu``
(pointer ``LATEST``); one serving the HF export with the python backend (``llm_backend=python``,
the CPU fallback when no engine exists) to channel ``cpu`` (pointer ``LATEST-cpu``). Version numbers
are shared; the manifest records the channel, and pull/rollback refuse a version of the other
channel, so a CPU repository can never become what a GPU deployment serves.

A version is uploaded under a new number, its manifest is written last, every file is read back
and checked against the manifest, and only then does the channel's pointer switch (one atomic
small-object write). A reader that resolves the pointer therefore never sees a half-written
version; a crashed upload leaves an unreferenced number that the next publish skips. A version is
*deployable* when it is valid and its server load test passed, or the caller explicitly skipped it
(``load_test="skip"``); an undeployable version (the load test could not run) is uploaded for
inspection but never pointed at, rolled back to or pulled (unless asked for explicitly).
Rollback re-verifies an older deployable version of the channel and points the pointer at it.

The bundle (``build_bundle``) is self-contained: ``model_repo/`` rendered with parameter paths
under ``mount`` (where the pod/container syncs the version, default ``/models/cosyvoice2``),
``cosyvoice2_model/`` (the CosyVoice2 model dir + ``spk2info.pt``), ``cosyvoice2_llm/`` (HF export:
tokenizer for the BLS) and ``trt_engines/`` (TensorRT-LLM engine).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field

from cosyvoice import storage
from cosyvoice.triton.render import MODELS, V1_MODELS, render_repo, replacing_dir, repo_values, repo_values_v1
from cosyvoice.triton.validate import ACOUSTIC_FILES, ValidationReport, validate_repo

MANIFEST = "manifest.json"
LATEST = "LATEST"
#: channel -> the pointer file its deployments resolve
CHANNELS = {"gpu": LATEST, "cpu": "LATEST-cpu"}
#: how the LLM is served -> channel
BACKEND_CHANNEL = {"tensorrtllm": "gpu", "python": "cpu"}
DEFAULT_MOUNT = "/models/cosyvoice2"
BUNDLE_DIRS = {"model_dir": "cosyvoice2_model", "hf_dir": "cosyvoice2_llm", "engine_dir": "trt_engines"}
_CHUNK = 8 << 20


class PublishError(RuntimeError):
    pass


# --- bundle ----------------------------------------------------------------------------------------

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
    ``mount`` to ``out``). ``spk2info`` (a file URL) is copied into the model dir. A CosyVoice1 model dir
    (``cosyvoice.yaml`` building a TransformerLM) makes a CosyVoice1 bundle: the model dir alone, served
    by ``V1_MODELS`` (its LLM on the python backend; ``engine_dir``/``hf_dir``/``models`` do not apply)."""
    os.makedirs(out, exist_ok=True)
    from cosyvoice.triton.runtime_v1 import model_family

    if model_family(model_dir) == "cosyvoice":
        return _build_v1_bundle(out, model_dir=model_dir, mount=mount, spk2info=spk2info, decoupled=decoupled,
                                max_batch_size=max_batch_size, bls_instances=bls_instances, overrides=overrides)
    sources = {"model_dir": model_dir, "hf_dir": hf_dir, "engine_dir": engine_dir}
    for key, folder in BUNDLE_DIRS.items():
        if key == "engine_dir" and llm_backend == "python":
            continue  # the HF export in cosyvoice2_llm/ is what the python LLM model serves
        storage.download_dir(sources[key], os.path.join(out, folder))
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


def _build_v1_bundle(out: str, *, model_dir: str, mount: str, spk2info: str | None, decoupled: bool,
                     max_batch_size: int, bls_instances: int, overrides: dict[str, str] | None) -> Bundle:
    folder = BUNDLE_DIRS["model_dir"]
    storage.download_dir(model_dir, os.path.join(out, folder))
    if spk2info:
        with open(os.path.join(out, folder, "spk2info.pt"), "wb") as f:
            f.write(storage.read_bytes(spk2info))
    values = repo_values_v1(model_dir=f"{mount.rstrip('/')}/{folder}", decoupled=decoupled,
                            max_batch_size=max_batch_size, bls_instances=bls_instances, overrides=overrides)
    # the token2wav rate comes from the bundle's own model dir (its serving path does not exist here)
    values.setdefault("token2wav_sample_rate", str(_v1_sample_rate(os.path.join(out, folder))))
    render_repo(os.path.join(out, "model_repo"), values, models=V1_MODELS)
    validation = validate_repo(os.path.join(out, "model_repo"), path_map={mount: out}, require_reference_models=False)
    return Bundle(out, mount, values, validation)


def _v1_sample_rate(local_model_dir: str) -> int:
    from cosyvoice.acoustic import runtimes

    return runtimes.sample_rate(local_model_dir)


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


def _channel_pointer(channel: str) -> str:
    if channel not in CHANNELS:
        raise ValueError(f"channel must be one of {sorted(CHANNELS)}, got {channel!r}")
    return CHANNELS[channel]


def latest(root: str, channel: str = "gpu") -> int | None:
    """The version the channel's pointer (``LATEST`` / ``LATEST-cpu``) names, or None."""
    url = storage.join(root, _channel_pointer(channel))
    if not storage.exists(url):
        return None
    text = storage.read_text(url).strip()
    if not text.isdigit():
        raise PublishError(f"{url}: {text!r} is not a version number")
    return int(text)


def manifest_channel(manifest: dict) -> str:
    """The channel of a version (versions from before channels existed: by their LLM backend)."""
    if manifest.get("channel"):
        return manifest["channel"]
    return "cpu" if manifest.get("values", {}).get("triton_backend") == "python" else "gpu"


def manifest_deployable(manifest: dict) -> bool:
    """Valid, and its server load test passed or was skipped on purpose (``load_test=skip``)."""
    if "deployable" in manifest:
        return bool(manifest["deployable"])
    load = manifest.get("server_load_test") or {}  # versions from before the field existed
    return bool(manifest.get("validation", {}).get("valid", True)) and (
        load.get("passed") is True or load.get("skipped") == "load_test=skip")


_DRIVE = re.compile(r"^[A-Za-z]:")


def unsafe_path(rel: object) -> str | None:
    """Why a manifest file path must not be used below a destination folder, or None when it is a
    plain relative POSIX path that stays inside it."""
    if not isinstance(rel, str) or not rel:
        return "empty or not a string"
    if "\\" in rel:
        return "contains a backslash"
    if "\0" in rel:
        return "contains a NUL character"
    if rel.startswith("/"):
        return "absolute path"
    if _DRIVE.match(rel):
        return "drive letter"
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return "'.', '..' or empty path component (would leave or alias the root)"
    return None


def read_manifest(root: str, version: int) -> dict:
    """The manifest of a version; raises when it is missing, malformed or names a file path
    that is not a plain relative path inside the version (``../``, absolute, ``\\``, ``C:``)."""
    url = storage.join(root, str(version), MANIFEST)
    if not storage.exists(url):
        raise PublishError(f"{root}: version {version} has no {MANIFEST} (incomplete upload)")
    try:
        manifest = json.loads(storage.read_text(url))
    except ValueError as exc:
        raise PublishError(f"{url}: not valid JSON: {exc}") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise PublishError(f"{url}: no 'files' table")
    bad = [f"{rel!r} ({why})" for rel in files if (why := unsafe_path(rel))]
    bad += [f"{rel!r} (entry lacks integer bytes / sha256)" for rel, info in files.items()
            if not (isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str))]
    if bad:
        raise PublishError(f"{url}: refusing version {version}, unsafe or malformed file entries: " + "; ".join(bad[:10]))
    return manifest


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
    channel: str = "gpu"
    promoted: bool = True  # the channel's pointer now names this version
    manifest: dict = field(repr=False, default_factory=dict)

    @property
    def pointer(self) -> str:
        return storage.join(self.root, CHANNELS[self.channel])

    def as_metadata(self) -> dict:
        load = self.manifest.get("server_load_test") or {}
        return {"root": self.root, "version": self.version, "previous_version": self.previous,
                "channel": self.channel, "pointer": self.pointer, "promoted": self.promoted,
                "llm_backend": self.manifest.get("llm_backend"), "engine_present": self.manifest.get("engine_present"),
                "load_test": load.get("status"),
                "manifest": storage.join(self.root, str(self.version), MANIFEST), "files": self.files,
                "bytes": self.bytes, "models": self.models, "publish_seconds": round(self.seconds, 2),
                "validation": self.manifest.get("validation", {}).get("valid"), "server_load_test": load}

    def summary(self) -> str:
        head = (f"version {self.version} of {self.root} ({self.files} files, {self.bytes / 1e6:.1f} MB, "
                f"models {', '.join(self.models)}; channel {self.channel})")
        name = CHANNELS[self.channel]
        if self.promoted:
            return f"published {head}; {name} {self.previous} -> {self.version}"
        reason = (self.manifest.get("server_load_test") or {}).get("reason", "not deployable")
        return f"uploaded {head} but NOT promoted ({reason}); {name} stays at {self.previous}"


def publish_bundle(bundle_dir: str, root: str, *, info: dict | None = None, channel: str = "gpu",
                   promote: bool = True) -> PublishReport:
    """Upload a local bundle as the next version of ``root``, verify it, then switch the channel's
    pointer (``promote=False``: upload and verify only, recorded as not deployable)."""
    started = time.monotonic()
    pointer = _channel_pointer(channel)
    previous = latest(root, channel)
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
                "total_bytes": sum(v["bytes"] for v in files.values()), "files": files, **(info or {}),
                "channel": channel, "deployable": bool(promote)}
    for rel in files:
        storage.upload_file(os.path.join(bundle_dir, rel), storage.join(prefix, *rel.split("/")))
    storage.write_text(storage.join(prefix, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    problems = verify_version(root, version)
    if problems:
        raise PublishError(f"{prefix}: upload does not match its manifest, {pointer} left at {previous}: "
                           + "; ".join(problems[:10]))
    if promote:
        storage.write_text(storage.join(root, pointer), f"{version}\n")
    return PublishReport(root=root, version=version, previous=previous, files=len(files),
                         bytes=manifest["total_bytes"], models=models, seconds=time.monotonic() - started,
                         channel=channel, promoted=bool(promote), manifest=manifest)


def _check_servable(root: str, version: int, manifest: dict, channel: str) -> None:
    """Raise unless ``version`` belongs to ``channel`` and is deployable."""
    found = manifest_channel(manifest)
    if found != channel:
        raise PublishError(f"{root}: version {version} belongs to channel {found!r} (llm_backend "
                           f"{manifest.get('llm_backend') or manifest.get('values', {}).get('triton_backend')}), "
                           f"not {channel!r}; pass --channel {found} to use it there")
    if not manifest_deployable(manifest):
        reason = (manifest.get("server_load_test") or {}).get("reason") or "its server load test did not pass"
        raise PublishError(f"{root}: version {version} is not deployable ({reason}); it was never promoted")


def rollback(root: str, *, to: int | None = None, channel: str = "gpu") -> tuple[int | None, int]:
    """Point the channel's pointer at version ``to`` (default: the newest complete deployable
    version of the channel below the current one) after re-verifying it; returns ``(previous, now)``."""
    pointer = _channel_pointer(channel)
    current = latest(root, channel)
    complete = sorted(v for v, done in versions(root).items() if done)
    if to is None:
        for v in reversed(complete):  # the newest match: read manifests only down to it
            if current is not None and v >= current:
                continue
            try:
                manifest = read_manifest(root, v)
            except PublishError:
                continue
            if manifest_channel(manifest) == channel and manifest_deployable(manifest):
                to = v
                break
        else:
            raise PublishError(f"{root}: no complete deployable {channel} version older than {current} to roll back to")
    elif to not in complete:
        raise PublishError(f"{root}: version {to} is not a complete version (have {complete})")
    else:
        _check_servable(root, to, read_manifest(root, to), channel)
    problems = verify_version(root, to)
    if problems:
        raise PublishError(f"{root}: version {to} fails verification, {pointer} left at {current}: "
                           + "; ".join(problems[:10]))
    storage.write_text(storage.join(root, pointer), f"{to}\n")
    return current, to


def pull(root: str, dest: str, *, version: int | None = None, channel: str = "gpu",
         allow_undeployable: bool = False) -> int:
    """Download a verified version (default: the channel's pointer) into local folder ``dest``
    (replaced as a whole, via a sibling temporary folder); returns the version.

    Refuses a version of another channel, an undeployable one (unless ``allow_undeployable``, for
    inspection) and a manifest naming a path outside the version (checked before anything is
    written)."""
    pointer = _channel_pointer(channel)
    if version is None:
        version = latest(root, channel)
        if version is None:
            others = {c: v for c in CHANNELS if c != channel and (v := latest(root, c)) is not None}
            hint = "".join(f"; channel {c} has version {v} (--channel {c})" for c, v in others.items())
            raise PublishError(f"{root}: nothing published on channel {channel} yet (no {pointer}){hint}")
    manifest = read_manifest(root, version)
    if manifest_channel(manifest) != channel or not allow_undeployable:
        _check_servable(root, version, manifest, channel)
    with replacing_dir(dest, prefix=".pull-") as tmp:
        real_tmp = os.path.realpath(tmp)
        for rel, info in manifest["files"].items():
            target = os.path.join(tmp, *rel.split("/"))
            if os.path.commonpath([real_tmp, os.path.realpath(target)]) != real_tmp:  # read_manifest refuses these
                raise PublishError(f"{root}: version {version}: {rel!r} leaves the destination")
            url = storage.join(root, str(version), *rel.split("/"))
            storage.download_file(url, target)
            if _sha256_local(target) != info["sha256"]:
                raise PublishError(f"{url}: sha256 differs from the manifest of version {version}")
    return version


# --- the stage -------------------------------------------------------------------------------------

def server_load_test(bundle: Bundle, work: str) -> dict:
    """Load the bundle's models in a real tritonserver (explicit mode) on this machine.

    Loaded: every python model whose runtime is importable here, ``token2wav`` with its acoustic
    runtime (by default ``Token2Wav`` on the bundle's ``flow.pt``/``hift.pt``). Not tested (and said
    so): ``tensorrt_llm`` on the tensorrtllm backend (no TensorRT-LLM here), and ``token2wav`` when
    its acoustic runtime is not installed or, for the default runtime, the model dir lacks the
    acoustic model files. A model that should load and does not fails the test."""
    from cosyvoice.triton import runtime
    from cosyvoice.triton.server import TritonServer

    repo = localize(bundle, os.path.join(work, "load_test_repo"))
    present = sorted(m for m in os.listdir(repo) if os.path.isfile(os.path.join(repo, m, "config.pbtxt")))
    not_tested: dict[str, str] = {}
    if bundle.values.get("triton_backend", "tensorrtllm") == "tensorrtllm" and "tensorrt_llm" in present:
        not_tested["tensorrt_llm"] = "tensorrtllm backend not available in the CPU tritonserver"
    if "token2wav" in present:
        spec = bundle.values.get("token2wav_runtime") or runtime.DEFAULT_TOKEN2WAV_RUNTIME
        model_dir = os.path.join(bundle.path, BUNDLE_DIRS["model_dir"])
        absent = [f for f in ACOUSTIC_FILES if not os.path.exists(os.path.join(model_dir, f))]
        try:
            runtime.load_object(spec)
        except (ImportError, AttributeError, ValueError) as exc:
            not_tested["token2wav"] = f"acoustic runtime {spec!r} not importable: {exc}"
        else:
            if spec == runtime.DEFAULT_TOKEN2WAV_RUNTIME and absent:
                not_tested["token2wav"] = f"model_dir lacks the acoustic model files {absent}"
    to_load = [m for m in present if m not in not_tested]
    started = time.monotonic()
    with TritonServer(repo, log_path=os.path.join(work, "tritonserver.log")) as server:
        server.load(*to_load)
        ready = server.ready()
    return {"passed": ready, "loaded": to_load, "not_tested": not_tested,
            "seconds": round(time.monotonic() - started, 1)}


def _server_env():
    """The CPU tritonserver environment for the load test: built by ``make triton-server``; raises
    ``ServerEnvMissing`` (saying so) when there is none here. Never installs anything."""
    from cosyvoice.triton.server import server_env

    return server_env()


def has_engine(url: str) -> bool:
    """The folder ``url`` (local or object store) holds a TensorRT-LLM engine: ``config.json`` and at
    least one ``rank<N>.engine``. A missing folder has none."""
    try:
        names = [u.rsplit("/", 1)[-1] for u, _ in storage.list_files(url)]
    except FileNotFoundError:
        return False
    return "config.json" in names and any(n.startswith("rank") and n.endswith(".engine") for n in names)


def engine_present(bundle_dir: str) -> bool:
    """The bundle carries a TensorRT-LLM engine (``config.json`` + ``rank<N>.engine``)."""
    return has_engine(os.path.join(bundle_dir, BUNDLE_DIRS["engine_dir"]))


def publish_triton_repo(root: str, *, engine_dir: str, hf_dir: str, model_dir: str, spk2info: str | None = None,
                        mount: str = DEFAULT_MOUNT, load_test: str = "auto", decoupled: bool = True,
                        max_batch_size: int = 16, bls_instances: int = 4, overrides: dict[str, str] | None = None,
                        llm_backend: str = "tensorrtllm") -> PublishReport:
    """Render + validate + server load test + publish a new version of ``root`` on the channel
    of ``llm_backend`` (``tensorrtllm``: ``gpu``/``LATEST``, ``python``: ``cpu``/``LATEST-cpu``).

    The manifest says what the version serves (``llm_backend``, ``channel``, ``engine_present``)
    and how it was tested (``server_load_test.status``: ``passed``, ``skipped`` = ``load_test="skip"``
    asked for it, ``not_run`` = ``"auto"`` found no tritonserver environment here).
    Blocking: an invalid repository or a failed load test publishes nothing; ``"require"`` also
    publishes nothing when the test cannot run. With ``"auto"`` and no environment the version is
    uploaded and verified but not promoted (``report.promoted`` False, ``deployable`` False)."""
    if load_test not in ("auto", "require", "skip"):
        raise ValueError(f"load_test must be auto, require or skip, got {load_test!r}")
    if llm_backend not in BACKEND_CHANNEL:
        raise ValueError(f"llm_backend must be one of {sorted(BACKEND_CHANNEL)}, got {llm_backend!r}")
    channel = BACKEND_CHANNEL[llm_backend]
    with tempfile.TemporaryDirectory(prefix="triton-publish-") as work:
        bundle = build_bundle(os.path.join(work, "bundle"), engine_dir=engine_dir, hf_dir=hf_dir, model_dir=model_dir,
                              mount=mount, spk2info=spk2info, decoupled=decoupled, max_batch_size=max_batch_size,
                              bls_instances=bls_instances, overrides=overrides, llm_backend=llm_backend)
        if not bundle.validation.ok:
            raise PublishError("model repository invalid, nothing published:\n" + bundle.validation.summary())
        load: dict = {"requested": load_test}
        if load_test == "skip":
            load.update(status="skipped", passed=None, reason="load_test=skip in the run configuration")
        else:
            try:
                _server_env()
            except Exception as exc:  # no tritonserver for this machine
                if load_test == "require":
                    raise PublishError(f"load_test=require but no tritonserver environment: {exc}") from exc
                load.update(status="not_run", passed=None, reason=f"load test did not run: no tritonserver "
                            f"environment ({exc}); build it (make triton-server) or set load_test: skip")
            else:
                load.update(server_load_test(bundle, work))
                if not load["passed"]:
                    raise PublishError(f"server load test failed, nothing published: {load}")
                load["status"] = "passed"
        deployable = load["status"] in ("passed", "skipped")
        return publish_bundle(bundle.path, root, channel=channel, promote=deployable, info={
            "mount": mount, "llm_backend": llm_backend, "engine_present": engine_present(bundle.path),
            "validation": bundle.validation.as_metadata(), "server_load_test": load, "values": bundle.values})
