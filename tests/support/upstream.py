"""Plain re-implementations of the upstream recipe tools, used as oracles by tests and benchmarks.

Written from the documented behaviour (shared/reference/cosyvoice-contracts.md section 1.1), not
copied: glob ``<src>/*/*/*wav``, skip utterances without ``.normalized.txt``, first line of the
text with newlines dropped, outputs in discovery order.
"""

from __future__ import annotations

import glob
import os


def upstream_prepare_data(src_dir: str, des_dir: str, instruct: str = "") -> None:
    utt2wav, utt2text, utt2spk, spk2utt = {}, {}, {}, {}
    for wav in glob.glob(f"{src_dir}/*/*/*wav"):
        txt = wav.replace(".wav", ".normalized.txt")
        if not os.path.exists(txt):
            continue
        with open(txt) as f:
            content = f.readline().replace("\n", "")
        utt = os.path.basename(wav).replace(".wav", "")
        spk = utt.split("_")[0]
        utt2wav[utt], utt2text[utt], utt2spk[utt] = wav, content, spk
        spk2utt.setdefault(spk, []).append(utt)
    os.makedirs(des_dir, exist_ok=True)
    files = {"wav.scp": utt2wav, "text": utt2text, "utt2spk": utt2spk,
             "spk2utt": {k: " ".join(v) for k, v in spk2utt.items()}}
    if instruct:
        files["instruct"] = {k: instruct for k in utt2wav}
    for name, table in files.items():
        with open(os.path.join(des_dir, name), "w") as f:
            for key, value in table.items():
                f.write(f"{key} {value}\n")


def _upstream_load(path: str):
    """``torchaudio.load`` stand-in: same float32 samples for PCM, (channels, samples)."""
    import soundfile as sf
    import torch

    samples, rate = sf.read(path, dtype="float32", always_2d=True)
    return torch.from_numpy(samples.T.copy()), rate


def upstream_embedding(path: str, session) -> list[float]:
    """tools/extract_embedding.py, per utterance."""
    import torchaudio
    import torchaudio.compliance.kaldi as kaldi

    audio, rate = _upstream_load(path)
    if rate != 16000:
        audio = torchaudio.transforms.Resample(orig_freq=rate, new_freq=16000)(audio)
    feat = kaldi.fbank(audio, num_mel_bins=80, dither=0, sample_frequency=16000)
    feat = feat - feat.mean(dim=0, keepdim=True)
    return session.run(None, {session.get_inputs()[0].name: feat.unsqueeze(dim=0).cpu().numpy()})[0].flatten().tolist()


def upstream_speech_token(path: str, session) -> list[int]:
    """tools/extract_speech_token.py, per utterance."""
    import numpy as np
    import torchaudio
    import whisper

    audio, rate = _upstream_load(path)
    if rate != 16000:
        audio = torchaudio.transforms.Resample(orig_freq=rate, new_freq=16000)(audio)
    if audio.shape[0] > 1:
        audio = audio.mean(dim=0, keepdim=True)
    if audio.shape[1] / 16000 > 30:
        return []
    feat = whisper.log_mel_spectrogram(audio, n_mels=128)
    inputs = session.get_inputs()
    return session.run(None, {inputs[0].name: feat.detach().cpu().numpy(),
                              inputs[1].name: np.array([feat.shape[2]], dtype=np.int32)})[0].flatten().tolist()


def upstream_session(path: str):
    import onnxruntime

    option = onnxruntime.SessionOptions()
    option.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    option.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(path, sess_options=option, providers=["CPUExecutionProvider"])
