"""Parallel CAM++ embedding and S3 speech-token extraction over (utt, path) items.

Each worker process owns one ONNX session (1 intra-op thread, like upstream) and computes its own
features, so decoding, resampling and fbank/log-mel run in parallel with inference instead of
queueing on the GIL as in upstream's thread pool. Results are returned sorted by utterance id; an
utterance that fails is reported with a reason, never fatal.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

from cosyvoice.features.options import EmbeddingOptions, SpeechTokenOptions
from cosyvoice.problems import UtteranceProblem

EMBEDDING_DIM = 192
#: the stage name each kind's failures are attributed to (and its ``failed_<stage>.tsv``)
FAILURE_STAGE = {"embedding": "extract_embedding", "speech_token": "extract_speech_token"}
_STATE: dict = {}  # per-process: kind, session, options


@dataclass
class ExtractionReport:
    kind: str
    requested: int
    results: dict = field(repr=False)  # utt -> list[float] | list[int]
    durations: dict[str, float] = field(repr=False)
    failures: list[UtteranceProblem]
    wall_seconds: float
    model_seconds: float
    long_skipped: list[str] = field(default_factory=list)
    long_chunked: list[str] = field(default_factory=list)
    runtime: str = "onnxruntime"
    precision: str = "fp32"
    agreement: float | None = None  # bf16 tokens equal to fp32 ones, on a sample
    agreement_utterances: int = 0
    failures_url: str | None = None  # where the stage stored ``failures`` (failed_<stage>.tsv / <shard>.failed.tsv)

    @property
    def audio_seconds(self) -> float:
        return sum(self.durations.values())

    @property
    def throughput(self) -> float:
        """Seconds of audio per wall-clock second."""
        return self.audio_seconds / self.wall_seconds if self.wall_seconds else 0.0

    def as_metadata(self) -> dict:
        return {
            "utterances": len(self.results),
            "failed": len(self.failures),
            "failed_by_reason": {r: sum(f.reason == r for f in self.failures) for r in sorted({f.reason for f in self.failures})},
            "audio_hours": round(self.audio_seconds / 3600, 5),
            "wall_seconds": round(self.wall_seconds, 3),
            "model_seconds": round(self.model_seconds, 3),
            "throughput_audio_s_per_s": round(self.throughput, 2),
            "real_time_factor": round(self.wall_seconds / self.audio_seconds, 5) if self.audio_seconds else None,
            **({"empty_long_audio": len(self.long_skipped), "chunked_long_audio": len(self.long_chunked),
                "runtime": self.runtime, "precision": self.precision}
               if self.kind == "speech_token" else {}),
            **({"bf16_token_agreement": round(self.agreement, 5), "agreement_utterances": self.agreement_utterances}
               if self.agreement is not None else {}),
        }


def _init_worker(kind: str, model_path: str, device: str, long_audio: str, env: dict | None = None,
                 batch_size: int = 1) -> None:
    import torch

    from cosyvoice import storage
    from cosyvoice.features.onnx import make_session

    if env:
        storage.use_environment(env)

    torch.set_num_threads(1)
    session = make_session(model_path, device=device, threads=1)
    if batch_size > 1 and not batch_capable(session):
        raise ValueError(f"{model_path}: --batch_size {batch_size} needs a tokenizer with a batch dimension "
                         "(e.g. speech_tokenizer_v2.batch.onnx); this one takes one utterance")
    _STATE.update(kind=kind, session=session, long_audio=long_audio, batch_size=batch_size)


def batch_capable(session) -> bool:
    """Inputs ``feats (B, 128, T)`` / ``feats_length (B,)`` with a symbolic B."""
    inputs = session.get_inputs()
    return len(inputs) == 2 and not isinstance(inputs[1].shape[0], int)


def _process(item: tuple[str, str]) -> tuple:
    """-> (utt, value | UtteranceProblem, audio_seconds, model_seconds, long_status)."""
    import numpy as np

    from cosyvoice.features import frontend

    utt, path = item
    session = _STATE["session"]
    try:
        audio, rate = frontend.load_audio(path)
    except frontend.AudioDecodeError as exc:
        return utt, UtteranceProblem(utt, path, exc.reason, str(exc)), 0.0, 0.0, None
    seconds = audio.shape[1] / rate
    embedding = _STATE["kind"] == "embedding"
    try:  # e.g. audio shorter than one analysis window
        if embedding:
            feats = [frontend.campplus_input(audio, rate)]
        else:
            windows = frontend.tokenizer_windows(frontend.mono_16k(audio, rate), _STATE["long_audio"])
            feats = [frontend.whisper_input(w) for w in windows]
    except Exception as exc:
        return utt, UtteranceProblem.from_exception(utt, path, "feature_error", exc), seconds, 0.0, None
    names = [i.name for i in session.get_inputs()]
    try:
        start = time.perf_counter()
        if embedding:
            vector = session.run(None, {names[0]: feats[0]})[0].flatten()
            model = time.perf_counter() - start
            if vector.shape != (EMBEDDING_DIM,):
                return utt, UtteranceProblem(utt, path, "bad_model_output", f"embedding shape {vector.shape}"), seconds, model, None
            return utt, vector.tolist(), seconds, model, None
        tokens: list[int] = []
        for mel in feats:
            out = session.run(None, {names[0]: mel, names[1]: np.array([mel.shape[2]], dtype=np.int32)})[0]
            tokens.extend(out.flatten().tolist())
        status = None if len(feats) == 1 else ("skipped" if not feats else "chunked")
        return utt, tokens, seconds, time.perf_counter() - start, status
    except Exception as exc:  # a bad utterance (e.g. too short for the model) must not stop the shard
        return utt, UtteranceProblem.from_exception(utt, path, "model_error", exc), seconds, 0.0, None


def _process_chunk(items: list[tuple[str, str]]) -> list[tuple]:
    if _STATE.get("batch_size", 1) > 1 and _STATE["kind"] == "speech_token":
        return _tokens_batched(items)
    return [_process(item) for item in items]


def _tokens_batched(items: list[tuple[str, str]]) -> list[tuple]:
    """Length-sorted batches with zero-padded mels and the true lengths (the model masks the
    padding, so every row's tokens equal the single-utterance result). Audio that needs
    skipping/chunking, undecodable files and any batch the model rejects go the per-utterance way."""
    import numpy as np

    from cosyvoice.features import frontend

    session, size = _STATE["session"], _STATE["batch_size"]
    names = [i.name for i in session.get_inputs()]
    out, ready = [], []
    for utt, path in items:
        try:
            audio, rate = frontend.load_audio(path)
        except frontend.AudioDecodeError as exc:
            out.append((utt, UtteranceProblem(utt, path, exc.reason, str(exc)), 0.0, 0.0, None))
            continue
        windows = frontend.tokenizer_windows(frontend.mono_16k(audio, rate), _STATE["long_audio"])
        if len(windows) != 1:
            out.append(_process((utt, path)))
            continue
        try:
            ready.append((utt, path, audio.shape[1] / rate, frontend.whisper_input(windows[0])[0]))
        except Exception as exc:  # e.g. audio shorter than one STFT window
            out.append((utt, UtteranceProblem.from_exception(utt, path, "feature_error", exc), audio.shape[1] / rate, 0.0, None))
    ready.sort(key=lambda r: r[3].shape[1])
    for start in range(0, len(ready), size):
        group = ready[start:start + size]
        lengths = np.array([r[3].shape[1] for r in group], dtype=np.int32)
        feats = np.zeros((len(group), group[0][3].shape[0], int(lengths.max())), dtype=np.float32)
        for i, r in enumerate(group):
            feats[i, :, :lengths[i]] = r[3]
        began = time.perf_counter()
        try:
            indices, token_lengths = session.run(None, {names[0]: feats, names[1]: lengths})[:2]
        except Exception:  # isolate the utterance the model cannot take
            out.extend(_process((utt, path)) for utt, path, _, _ in group)
            continue
        model = time.perf_counter() - began
        share = lengths / lengths.sum()
        for i, (utt, _, seconds, _) in enumerate(group):
            out.append((utt, indices[i, :int(token_lengths[i])].tolist(), seconds, float(model * share[i]), None))
    return out


def run_extraction(
    items: Sequence[tuple[str, str]],
    model_path: str,
    options: EmbeddingOptions | SpeechTokenOptions,
    *,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> ExtractionReport:
    """Extract ``options.kind`` (embeddings for :class:`EmbeddingOptions`, speech tokens for
    :class:`SpeechTokenOptions`) for every ``(utt, path)``.

    Speech tokens run on onnxruntime (default; the upstream tool's runtime) or, with
    ``Runtime.torch``, on the torch module built from the same ONNX file (mel on the device,
    ``Precision.bf16`` possible, agreement with fp32 measured on ``agreement_sample`` utterances).
    The options validated themselves when they were built."""
    kind = options.kind
    num_workers = options.num_workers or default_workers()
    tokens = options if isinstance(options, SpeechTokenOptions) else SpeechTokenOptions()
    device, long_audio, batch_size = tokens.device.value, tokens.long_audio.value, tokens.batch_size
    runtime, precision = tokens.runtime.value, tokens.precision.value
    started = time.perf_counter()
    items = sorted(items)
    if runtime == "torch":
        from cosyvoice.features.torch_runtime import run_torch_tokens

        collected, agreed, agreement_utts = run_torch_tokens(
            items, model_path, num_workers=max(0, min(num_workers, len(items))), device=device,
            long_audio=long_audio, batch_size=batch_size, precision=precision,
            agreement_sample=tokens.agreement_sample, progress=progress)
        return _report(kind, items, collected, started, runtime=runtime, precision=precision,
                       agreement=agreed, agreement_utterances=agreement_utts)
    workers = max(1, min(num_workers, len(items)))
    from cosyvoice import storage

    init_args = (kind, model_path, device, long_audio, storage.environment(), batch_size)
    batched = kind == "speech_token" and batch_size > 1
    if workers == 1:
        _init_worker(*init_args)
        step = batch_size * 8
        outputs: Iterable = ((out for i in range(0, len(items), step) for out in _tokens_batched(items[i:i + step]))
                             if batched else (_process(item) for item in items))
        if progress is not None:
            outputs = progress(outputs)
        collected = list(outputs)
    else:
        size = max(1, min(4, len(items) // (workers * 8)))  # small chunks: no straggler at the end
        if batched:
            size = max(batch_size, min(batch_size * 8, len(items) // workers))
        chunks = [items[i:i + size] for i in range(0, len(items), size)]
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["cosyvoice.features.frontend", "cosyvoice.features.onnx"])
        # an executor, not multiprocessing.Pool: a failing initializer (e.g. an unreadable model)
        # must raise BrokenProcessPool here instead of being retried forever
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=init_args) as pool:
            futures = [pool.submit(_process_chunk, chunk) for chunk in chunks]
            flat = (out for future in as_completed(futures) for out in future.result())
            collected = list(progress(flat) if progress is not None else flat)

    return _report(kind, items, collected, started)


def _report(kind: str, items: list, collected: list[tuple], started: float, **extra) -> ExtractionReport:
    results, durations, failures, model_total = {}, {}, [], 0.0
    skipped, chunked = [], []
    for utt, value, seconds, model, status in sorted(collected, key=lambda r: r[0]):
        model_total += model
        if isinstance(value, UtteranceProblem):
            failures.append(value.at(FAILURE_STAGE[kind]))
            continue
        results[utt], durations[utt] = value, seconds
        if status == "skipped":
            skipped.append(utt)
        elif status == "chunked":
            chunked.append(utt)
    return ExtractionReport(kind=kind, requested=len(items), results=results, durations=durations,
                            failures=failures, wall_seconds=time.perf_counter() - started,
                            model_seconds=model_total, long_skipped=skipped, long_chunked=chunked, **extra)


def speaker_means(utt2embedding: dict[str, list[float]], utt2spk: dict[str, str]) -> dict[str, list[float]]:
    """Plain float32 mean of each speaker's utterance vectors (not normalised), as upstream."""
    import torch

    grouped: dict[str, list[list[float]]] = {}
    for utt in sorted(utt2embedding):
        grouped.setdefault(utt2spk[utt], []).append(utt2embedding[utt])
    return {spk: torch.tensor(vectors).mean(dim=0).tolist() for spk, vectors in sorted(grouped.items())}


def default_workers(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The cores this process may use: inside a Kubernetes pod ``os.cpu_count()`` is the node's core count,
    so the CPU affinity and the cgroup v2 quota (``cpu.max``, what a pod's CPU limit sets) bound it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open(cpu_max) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)
