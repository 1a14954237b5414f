"""``spk2info.pt``: the speaker-prompt cache the BLS (cosyvoice2 / cosyvoice) uses when a request has no voice.

Format (upstream ``runtime/triton_trtllm``): a torch-saved dict ``{speaker_key: {"prompt_text":
str, "speech_token": int32 [1, T], "speech_feat": float32 [1, 2T, 80], "embedding": float32
[1, 192]}}``; the BLS uses key ``"001"``. We build it from chosen speakers of a prepared data dir
(``wav.scp``, ``text``, ``utt2spk``): per speaker one prompt utterance (the given one, else the
speaker's first utterance of 3-30 s), with the same tokenizer / CAM++ / flow-mel computations as
the Triton models. The first speaker is also stored as ``"001"``. Plain tensors and strings only,
so it loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cosyvoice import storage
from cosyvoice.corpus.kaldi import read_table
from cosyvoice.triton import runtime

#: 16 kHz samples -> (speech tokens, flow-prompt mel [frames, 80], CAM++ embedding [192])
PromptMaker = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]

MIN_PROMPT_SECONDS = 1.0
MAX_PROMPT_SECONDS = 30.0


@dataclass
class Spk2InfoReport:
    url: str
    speakers: dict[str, str] = field(default_factory=dict)  # key -> prompt utterance
    tokens: dict[str, int] = field(default_factory=dict)
    bytes: int = 0

    def as_metadata(self) -> dict:
        return {"spk2info": self.url, "speakers": self.speakers, "prompt_tokens": self.tokens, "bytes": self.bytes}


def _prompt_audio(url: str) -> np.ndarray:
    from cosyvoice.features import frontend

    audio, rate = frontend.load_audio(url)
    return frontend.mono_16k(audio, rate)[0].numpy()


def prompt_maker(model_dir: str) -> PromptMaker:
    """How the BLS serving ``model_dir`` turns reference audio into a prompt: its family's speech tokenizer
    (``campplus.onnx`` and ``speech_tokenizer_v1.onnx`` / ``_v2.onnx`` must be in the dir) and mel."""
    from cosyvoice.model_family import COSYVOICE1, model_dir_family

    if model_dir_family(model_dir) is COSYVOICE1:
        from cosyvoice.triton.runtime_v1 import CAMPPLUS_FILE, SPEECH_TOKENIZER_FILE, ReferenceFrontend

        frontend = ReferenceFrontend.from_model_dir(model_dir)
        if frontend is None:
            raise FileNotFoundError(f"{model_dir}: a CosyVoice1 model dir needs {SPEECH_TOKENIZER_FILE} and "
                                    f"{CAMPPLUS_FILE} to build spk2info.pt")
        return frontend.prompt
    tokenizer = runtime.onnx_session(os.path.join(model_dir, "speech_tokenizer_v2.onnx"))
    campplus = runtime.onnx_session(os.path.join(model_dir, "campplus.onnx"))

    def v2_prompt(wav: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tokens, feat = runtime.align_prompt(runtime.speech_tokens(tokenizer, wav), runtime.prompt_speech_feat(wav))
        return tokens, feat, runtime.speaker_embedding(campplus, wav)

    return v2_prompt


def build_spk2info(data_dir: str, model_dir: str, out_url: str, *, speakers: list[str],
                   prompt_utts: dict[str, str] | None = None) -> Spk2InfoReport:
    """Write ``out_url`` (``.../spk2info.pt``) for ``speakers`` of ``data_dir``, prompts as the BLS serving
    ``model_dir`` makes them (:func:`prompt_maker`)."""
    import torch

    if not speakers:
        raise ValueError("build_spk2info: choose at least one speaker (the first becomes '001')")
    wavs = read_table(data_dir, "wav.scp")
    texts = read_table(data_dir, "text", joined=True)
    utt2spk = read_table(data_dir, "utt2spk")
    prompt_utts = dict(prompt_utts or {})
    by_speaker: dict[str, list[str]] = {}
    for utt in sorted(utt2spk):
        by_speaker.setdefault(utt2spk[utt], []).append(utt)
    make_prompt = prompt_maker(model_dir)
    table: dict[str, dict] = {}
    report = Spk2InfoReport(url=out_url)
    for spk in speakers:
        if spk not in by_speaker:
            raise ValueError(f"{data_dir}: speaker {spk!r} has no utterances (utt2spk)")
        candidates = [prompt_utts[spk]] if spk in prompt_utts else by_speaker[spk]
        chosen = None
        for utt in candidates:
            if utt not in wavs or utt not in texts:
                raise ValueError(f"{data_dir}: prompt utterance {utt!r} lacks wav.scp or text")
            wav = _prompt_audio(wavs[utt])
            seconds = len(wav) / runtime.SAMPLE_RATE
            if spk in prompt_utts or MIN_PROMPT_SECONDS <= seconds <= MAX_PROMPT_SECONDS:
                chosen = (utt, wav)
                break
        if chosen is None:
            raise ValueError(f"{data_dir}: speaker {spk!r} has no utterance of {MIN_PROMPT_SECONDS:.0f}-"
                             f"{MAX_PROMPT_SECONDS:.0f} s; name one with prompt_utts")
        utt, wav = chosen
        tokens, feat, embedding = make_prompt(wav)
        entry = {
            "prompt_text": texts[utt],
            "speech_token": torch.from_numpy(tokens.astype(np.int32))[None],
            "speech_feat": torch.from_numpy(feat.astype(np.float32))[None],
            "embedding": torch.from_numpy(np.asarray(embedding, dtype=np.float32))[None],
        }
        table[spk] = entry
        report.speakers[spk] = utt
        report.tokens[spk] = len(tokens)
    first = speakers[0]
    table["001"] = table[first]
    report.speakers["001"] = report.speakers[first]
    report.tokens["001"] = report.tokens[first]
    buffer = io.BytesIO()
    torch.save(table, buffer)
    report.bytes = storage.write_bytes(out_url, buffer.getvalue()).bytes
    return report
