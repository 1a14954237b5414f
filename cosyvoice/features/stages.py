"""The feature stages as drop-ins for upstream ``tools/extract_embedding.py`` and
``tools/extract_speech_token.py``, plus the per-shard form the pipeline uses."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from cosyvoice import storage
from cosyvoice.corpus.kaldi import parse_lines
from cosyvoice.corpus.shard_plan import loads_plan
from cosyvoice.features.extract import ExtractionReport, default_workers, run_extraction, speaker_means
from cosyvoice.features.store import save_pt


def read_kaldi_file(data_dir: str, name: str) -> dict[str, str]:
    url = storage.join(data_dir, name)
    if not storage.exists(url):
        raise FileNotFoundError(f"{url} does not exist (is {data_dir} a data directory?)")
    return parse_lines(storage.read_text(url), source=url)


def shard_items(data_dir: str, shard: str | None) -> list[tuple[str, str]]:
    """``(utt, path)`` for the whole data dir, or for one shard of its ``shards.json``."""
    wavs = read_kaldi_file(data_dir, "wav.scp")
    if shard is None:
        return sorted(wavs.items())
    plan_url = storage.join(data_dir, "shards.json")
    if not storage.exists(plan_url):
        raise FileNotFoundError(f"{plan_url} does not exist: --shard needs a manifest written by prepare-libritts")
    plan = loads_plan(storage.read_text(plan_url))
    if shard not in plan:
        raise ValueError(f"shard {shard!r} is not in {plan_url} (it has {len(plan)} shards, e.g. {next(iter(plan), '-')})")
    missing = [u for u in plan[shard] if u not in wavs]
    if missing:
        raise ValueError(f"{len(missing)} utterance(s) of shard {shard} are not in wav.scp, e.g. {missing[0]}")
    return [(u, wavs[u]) for u in plan[shard]]


def _output_dir(data_dir: str, shard: str | None) -> str:
    return data_dir if shard is None else storage.join(data_dir, "shards", shard)


def extract_embedding(data_dir: str, onnx_path: str, *, num_thread: int | None = None, shard: str | None = None,
                      progress: Callable[[Iterable], Iterable] | None = None) -> ExtractionReport:
    """CAM++ embeddings for ``wav.scp`` -> ``utt2embedding.pt`` and ``spk2embedding.pt``."""
    utt2spk = read_kaldi_file(data_dir, "utt2spk")
    report = run_extraction("embedding", shard_items(data_dir, shard), onnx_path,
                            num_workers=num_thread or default_workers(), progress=progress)
    out = _output_dir(data_dir, shard)
    save_pt(storage.join(out, "utt2embedding.pt"), report.results)
    save_pt(storage.join(out, "spk2embedding.pt"), speaker_means(report.results, utt2spk))
    return report


def extract_speech_token(data_dir: str, onnx_path: str, *, num_thread: int | None = None, device: str = "cpu",
                         long_audio: str = "skip", shard: str | None = None,
                         progress: Callable[[Iterable], Iterable] | None = None) -> ExtractionReport:
    """S3 speech tokens for ``wav.scp`` -> ``utt2speech_token.pt`` (``[]`` for skipped > 30 s audio)."""
    report = run_extraction("speech_token", shard_items(data_dir, shard), onnx_path,
                            num_workers=num_thread or default_workers(), device=device, long_audio=long_audio,
                            progress=progress)
    save_pt(storage.join(_output_dir(data_dir, shard), "utt2speech_token.pt"), report.results)
    return report
