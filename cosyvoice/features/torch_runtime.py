"""Speech tokens on the torch runtime: CPU processes decode and resample, this process computes the
log-mel on the device and runs length-sorted batches of tokenizer windows.

Rows have the shape the onnxruntime path returns, ``(utt, tokens | problem, audio seconds, model
seconds, long-audio status)``, so both feed the same report.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from cosyvoice.problems import UtteranceProblem


def _init_decoder(env: dict | None) -> None:
    import torch

    from cosyvoice import storage

    if env:
        storage.use_environment(env)
    torch.set_num_threads(1)


def _decode_windows(item: tuple[str, str], long_audio: str) -> tuple:
    """-> (utt, path, [16 kHz (1, n) windows] | problem, audio seconds)."""
    from cosyvoice.features import frontend

    utt, path = item
    try:
        audio, rate = frontend.load_audio(path)
    except frontend.AudioDecodeError as exc:
        return utt, path, UtteranceProblem(utt, path, exc.reason, str(exc)), 0.0
    return utt, path, frontend.tokenizer_windows(frontend.mono_16k(audio, rate), long_audio), audio.shape[1] / rate


def bounded_map(pool: ProcessPoolExecutor, fn: Callable, items: Sequence, ahead: int) -> Iterable:
    """``pool.map`` in order, but with at most ``ahead`` results in flight: decoded audio waits in
    memory only as far ahead of the model as needed (``Executor.map`` submits everything at once)."""
    queue: deque = deque()
    for item in items:
        queue.append(pool.submit(fn, item))
        if len(queue) >= ahead:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()


@dataclass
class _Pending:
    path: str
    seconds: float
    windows: int
    pieces: dict[int, list[int]] = field(default_factory=dict)
    model_seconds: float = 0.0


class WindowBatcher:
    """Collects the tokens of each utterance's windows, batch by batch, into finished rows."""

    def __init__(self, tokenizer, agreement_sample: int):
        self.tokenizer, self.agreement_sample = tokenizer, agreement_sample
        self.rows: list[tuple] = []
        self.pending: dict[str, _Pending] = {}
        self.compared: list[tuple[list[int], list[int]]] = []  # (bf16, fp32) token lists
        self.compared_utts: set[str] = set()

    def fail(self, utt: str, path: str, reason: str, exc: Exception, seconds: float = 0.0) -> None:
        self.pending.pop(utt, None)
        self.rows.append((utt, UtteranceProblem.from_exception(utt, path, reason, exc), seconds, 0.0, None))

    def run(self, group: list[tuple]) -> None:
        """Tokens of ``(utt, window index, mel)`` entries; a batch the model rejects is retried one
        window at a time, so only the utterance it cannot take fails."""
        group = [g for g in group if g[0] in self.pending]  # an utterance with a failed window is done
        if not group:
            return
        mels = [mel for _, _, mel in group]
        began = time.perf_counter()
        try:
            outputs = self.tokenizer.tokens(mels)
        except Exception as exc:  # e.g. device memory for one large batch
            self.tokenizer.release_cached_memory()
            if len(group) > 1:
                for one in group:
                    self.run([one])
            else:
                self.fail(group[0][0], self.pending[group[0][0]].path, "model_error", exc)
            return
        spent = time.perf_counter() - began
        self._compare(group, mels, outputs)
        frames = sum(m.shape[1] for m in mels)
        for (utt, index, mel), codes in zip(group, outputs):
            entry = self.pending[utt]
            entry.pieces[index] = codes
            entry.model_seconds += spent * mel.shape[1] / frames
            if len(entry.pieces) == entry.windows:
                del self.pending[utt]
                tokens = [c for i in range(entry.windows) for c in entry.pieces[i]]
                self.rows.append((utt, tokens, entry.seconds, entry.model_seconds,
                                  None if entry.windows == 1 else "chunked"))

    def _compare(self, group: list[tuple], mels: list, outputs: list[list[int]]) -> None:
        """Below fp32, also run the first ``agreement_sample`` utterances in fp32."""
        if self.tokenizer.precision == "fp32" or len(self.compared_utts) >= self.agreement_sample:
            return
        take = []
        for i, (utt, _, _) in enumerate(group):
            if utt in self.compared_utts or len(self.compared_utts) < self.agreement_sample:
                self.compared_utts.add(utt)
                take.append(i)
        reference = self.tokenizer.tokens([mels[i] for i in take], precision="fp32")
        self.compared.extend(zip([outputs[i] for i in take], reference))


def run_torch_tokens(items: list[tuple[str, str]], model_path: str, *, num_workers: int, device: str,
                     long_audio: str, batch_size: int, precision: str, agreement_sample: int,
                     progress: Callable[[Iterable], Iterable] | None = None) -> tuple[list[tuple], float | None, int]:
    """Rows for every item and, below fp32, the token agreement with fp32 on the first
    ``agreement_sample`` utterances and how many utterances that was."""
    from cosyvoice import storage
    from cosyvoice.features.torch_tokenizer import TorchSpeechTokenizer, agreement

    tokenizer = TorchSpeechTokenizer(model_path, device=device, precision=precision)
    decode = partial(_decode_windows, long_audio=long_audio)
    pool = None
    if num_workers > 1:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["cosyvoice.features.frontend"])
        pool = ProcessPoolExecutor(num_workers, mp_context=context, initializer=_init_decoder,
                                   initargs=(storage.environment(),))
    decoded = bounded_map(pool, decode, items, ahead=max(64, 4 * batch_size)) if pool else map(decode, items)
    if progress is not None:
        decoded = progress(decoded)
    batcher = WindowBatcher(tokenizer, agreement_sample)
    buffer: list[tuple] = []
    try:
        for utt, path, windows, seconds in decoded:
            if isinstance(windows, UtteranceProblem):
                batcher.rows.append((utt, windows, seconds, 0.0, None))
                continue
            if not windows:
                batcher.rows.append((utt, [], seconds, 0.0, "skipped"))
                continue
            try:
                mels = [tokenizer.log_mel(w) for w in windows]
            except Exception as exc:  # e.g. audio shorter than one STFT window
                batcher.fail(utt, path, "feature_error", exc, seconds)
                continue
            batcher.pending[utt] = _Pending(path, seconds, len(windows))
            buffer.extend((utt, i, mel) for i, mel in enumerate(mels))
            if len(buffer) >= batch_size * 8:  # sort a window of batches by length: little padding
                buffer.sort(key=lambda b: b[2].shape[1])
                while len(buffer) >= batch_size:
                    batcher.run(buffer[:batch_size])
                    del buffer[:batch_size]
        buffer.sort(key=lambda b: b[2].shape[1])
        for start in range(0, len(buffer), batch_size):
            batcher.run(buffer[start:start + batch_size])
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if not batcher.compared:
        return batcher.rows, None, 0
    score = agreement([c for c, _ in batcher.compared], [r for _, r in batcher.compared])
    return batcher.rows, score, len(batcher.compared_utts)
