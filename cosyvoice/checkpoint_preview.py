"""What a freshly trained acoustic checkpoint makes of one held-out utterance, drawn as a PNG.

The ``flow_checkpoint`` / ``hift_checkpoint`` assets show it beside their loss curves
(:func:`checkpoint_preview`):

* ``flow``: the trained flow's mel for the speech tokens and embedding of the first utterance of
  ``cv.data.list``, over the ground-truth mel of that utterance's audio (the recipe's
  ``feat_extractor``, what the flow is trained to produce), with their mean absolute difference.
* ``hift``: the waveform the trained HiFT vocodes from that ground-truth mel, drawn as waveform +
  spectrogram (:func:`cosyvoice.acoustic.preview.render_png`), with the difference between the mel
  of the vocoded audio and the input mel.

Either generation: a CosyVoice1 recipe (``MaskedDiffWithXvec``) previews its 50 Hz tokens through
``FlowV1Model`` and a 22.05 kHz HiFT, a CosyVoice2 one its 25 Hz tokens at 24 kHz; the recipe decides.

The checkpoint must load strictly into the runtime's module (:func:`load_trained`: ``load_flow`` /
``load_flow_v1`` / ``load_hift`` with the training recipe's sizes): a file in another layout raises ``ValueError``,
since the averaged file would not serve either. What comes after loading (reading the CV
utterance, inference, drawing) only illustrates: a problem there gives a preview with ``status``
``failed`` and the reason. A checkpoint this process cannot see (the trainer wrote it on a volume
not mounted here) gives ``skipped``.
"""

from __future__ import annotations

import base64
import io
import logging
import os
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_SECONDS = 4.0


@dataclass
class CvUtterance:
    """One CV utterance as the acoustic models see it: speech tokens (N,) at ``token_rate`` per second,
    the embedding (192,) the recipe's padding picks (utterance or speaker), the ground-truth mel of those
    tokens (CosyVoice2: 2 N frames; CosyVoice1: N / 50 s of 22.05 kHz / 256 frames), the recipe's mel
    settings that computed it, and the audio."""

    utt: str
    tokens: np.ndarray
    embedding: np.ndarray
    mel: np.ndarray
    mel_config: object  # cosyvoice.dataset.mel.MelConfig
    speech: np.ndarray
    sample_rate: int
    token_rate: int = 25


@dataclass
class CheckpointPreview:
    """``status``: ``rendered`` (``png`` holds the picture), ``failed`` or ``skipped`` (``reason``
    says why). ``mel_l1``: mean absolute log-mel difference to the CV utterance's (flow: generated
    vs ground truth; HiFT: the vocoded audio's mel vs the input mel)."""

    model: str
    status: str
    reason: str = ""
    png: bytes | None = None
    utterance: str = ""
    frames: int = 0
    seconds: float = 0.0
    mel_l1: float | None = None

    def markdown(self) -> str:
        """The picture inline (a data URI), or why there is none."""
        if self.png is None:
            return f"no {self.model} preview ({self.status}): {self.reason}"
        encoded = base64.b64encode(self.png).decode()
        return f"![{self.model} preview: {self.utterance}](data:image/png;base64,{encoded})"

    def as_metadata(self) -> dict:
        """``preview_*`` entries: what was drawn, or the status and reason."""
        if self.status != "rendered":
            return {"preview_status": self.status, "preview_reason": self.reason}
        return {"preview_status": self.status, "preview_utterance": self.utterance, "preview_frames": self.frames,
                "preview_seconds": round(self.seconds, 3), "preview_mel_l1": round(float(self.mel_l1), 4)}


def first_cv_utterance(cv_list: str, recipe: str, *, seconds: float = DEFAULT_SECONDS) -> CvUtterance:
    """The first utterance of the first shard of ``cv_list`` with tokens, embedding and audio, cut
    to at most ``seconds`` (whole tokens), its mel computed with ``recipe``'s feature settings. The
    token rate is the recipe's generation's (:func:`cosyvoice.model_family.recipe_family`)."""
    from cosyvoice.config import load_recipe
    from cosyvoice.dataset import processors as P
    from cosyvoice.dataset.pipeline import PipelineConfig, read_data_list
    from cosyvoice.model_family import recipe_family

    shards = read_data_list(cv_list)
    if not shards:
        raise ValueError(f"{cv_list}: no CV shards listed")
    config = PipelineConfig.from_recipe(load_recipe(recipe, {k: None for k in ("llm", "flow", "hift", "hifigan")}))
    token_rate = recipe_family(recipe).tokens_per_second
    rows = P.parquet_opener([{"src": shards[0]}], batch_rows=1)
    rows = P.decode_audio(rows)
    rows = P.resample(rows, resample_rate=config.resample_rate)
    rows = P.compute_fbank(rows, mel_config=config.mel, samples_per_token=config.samples_per_token)
    rows = P.parse_embedding(rows)
    for row in rows:
        if not len(row.get("speech_token") or []) or row.get("utt_embedding") is None:
            continue
        available = row["speech_feat"].shape[0]
        n = min(len(row["speech_token"]), max(1, round(seconds * token_rate)))
        while n > 1 and mel_frames(n, token_rate, config.mel) > available:
            n -= 1
        frames = min(mel_frames(n, token_rate, config.mel), available)
        embedding = row["spk_embedding"] if config.use_spk_embedding else row["utt_embedding"]
        samples = n * config.samples_per_token if config.samples_per_token else frames * config.mel.hop
        return CvUtterance(utt=row["utt"], tokens=np.asarray(row["speech_token"][:n], dtype=np.int64),
                           embedding=np.asarray(embedding, dtype=np.float32).reshape(-1),
                           mel=row["speech_feat"][:frames].numpy().astype(np.float32), mel_config=config.mel,
                           speech=row["speech"][0, :samples].numpy().astype(np.float32),
                           sample_rate=int(row["sample_rate"]), token_rate=token_rate)
    raise ValueError(f"{shards[0]}: no utterance with speech tokens and an embedding")


def mel_frames(tokens: int, token_rate: int, mel_config) -> int:
    """Mel frames the flow makes of ``tokens``: ``int(n / rate * sample_rate / hop)`` in integers (CosyVoice2:
    2 per token; CosyVoice1: upstream's ``int(n / 50 * 22050 / 256)``)."""
    return tokens * mel_config.sample_rate // (token_rate * mel_config.hop)


#: the acoustic models this module previews (the pipeline's names: ``hift`` is trained as ``hifigan``)
ACOUSTIC_MODELS = ("flow", "hift")


def load_trained(model: str, checkpoint: str, recipe: str):
    """The trained ``flow`` or ``hift`` (generator) of ``checkpoint`` (a trainer checkpoint, with its
    ``epoch``/``step`` entries, or an averaged file), built strictly with ``recipe``'s sizes, in eval
    mode; ``ValueError`` naming the mismatching keys otherwise. The recipe's flow class picks the
    generation: ``FlowV1Model`` for CosyVoice1, ``FlowModel`` for CosyVoice2 (HiFT is one module)."""
    from cosyvoice.acoustic.flow import load_flow
    from cosyvoice.acoustic.flow_v1 import load_flow_v1
    from cosyvoice.acoustic.hift import load_hift
    from cosyvoice.acoustic.recipe import acoustic_configs, acoustic_configs_v1, flow_generation
    from cosyvoice.train.checkpoint import load_model_weights

    if model not in ACOUSTIC_MODELS:
        raise ValueError(f"{model!r} is not an acoustic model (one of {', '.join(ACOUSTIC_MODELS)})")
    weights, _, _ = load_model_weights(checkpoint)
    v1 = flow_generation(recipe) == 1
    flow_config, hift_config = (acoustic_configs_v1 if v1 else acoustic_configs)(recipe)
    if model == "hift":
        return load_hift(weights, hift_config)
    return (load_flow_v1 if v1 else load_flow)(weights, flow_config)


def checkpoint_preview(model: str, checkpoint: str, recipe: str, cv_list: str, *,
                       seconds: float = DEFAULT_SECONDS) -> CheckpointPreview:
    """What the trained ``model`` (``flow`` or ``hift``) of ``checkpoint`` makes of the first CV
    utterance (see the module docstring). Raises ``ValueError`` when the checkpoint does not load
    strictly (:func:`load_trained`); any later problem gives a ``failed`` preview saying why."""
    title = {"flow": "flow", "hift": "HiFT"}.get(model, model)
    if model in ACOUSTIC_MODELS and not os.path.isfile(checkpoint):
        return CheckpointPreview(title, "skipped", f"{checkpoint} is not readable from this process (the trainer's "
                                 "volume is not mounted here)")
    module = load_trained(model, checkpoint, recipe)
    try:
        utt = first_cv_utterance(cv_list, recipe, seconds=seconds)
        render = _render_flow if model == "flow" else _render_hift
        png, mel, duration = render(module, utt, os.path.basename(checkpoint))
        if not np.isfinite(mel).all():
            raise ValueError(f"the trained {title} gives non-finite values")
        frames = min(len(mel), len(utt.mel))
        l1 = float(np.abs(mel[:frames] - utt.mel[:frames]).mean())
    except Exception as exc:  # the picture illustrates; the CV gate judges the checkpoint
        log.warning("%s preview of %s failed: %s: %s", title, checkpoint, type(exc).__name__, exc)
        return CheckpointPreview(title, "failed", f"{type(exc).__name__}: {exc}")
    return CheckpointPreview(title, "rendered", png=png, utterance=utt.utt, frames=frames, seconds=duration, mel_l1=l1)


def _render_flow(flow, utt: CvUtterance, label: str) -> tuple[bytes, np.ndarray, float]:
    """The flow's mel for the utterance's tokens (no prompt) drawn over the ground truth."""
    import torch

    from cosyvoice.acoustic.flow_v1 import FlowV1Model

    args = (torch.from_numpy(utt.tokens)[None], torch.zeros(1, 0, dtype=torch.int64),
            torch.zeros(1, 0, utt.mel.shape[1]), torch.from_numpy(utt.embedding)[None])
    if isinstance(flow, FlowV1Model):  # its noise is drawn from torch's global generator: seeded, left untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            mel = flow.inference(*args)[0][0].T.numpy()
    else:  # the CosyVoice2 flow's noise table is fixed
        mel = flow.inference(*args, finalize=True, chunked=False)[0].T.numpy()
    frame_ms = 1000 * utt.mel_config.hop / utt.mel_config.sample_rate
    png = mel_png({f"trained flow ({label})": mel, f"ground truth ({utt.utt})": utt.mel}, frame_ms=frame_ms)
    return png, mel, len(utt.tokens) / utt.token_rate


def _render_hift(hift, utt: CvUtterance, label: str) -> tuple[bytes, np.ndarray, float]:
    """The waveform vocoded from the utterance's mel (seeded source noise), and its own mel."""
    import torch

    from cosyvoice.acoustic.preview import render_png
    from cosyvoice.dataset.mel import mel_spectrogram

    wav, _ = hift.inference(torch.from_numpy(utt.mel.T.copy())[None], generator=torch.Generator().manual_seed(0))
    rate = hift.config.sampling_rate
    png = render_png(wav[0].numpy(), rate, title=f"HiFT ({label}) vocoding the mel of {utt.utt}")
    return png, mel_spectrogram(wav, utt.mel_config)[0].T.numpy(), wav.shape[1] / rate


def mel_png(mels: dict[str, np.ndarray], *, frame_ms: float = 20.0) -> bytes:
    """(frames, bins) log-mels (``frame_ms`` apart), one panel each, top to bottom on one colour scale,
    as PNG bytes. Drawn on a private Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    low = min(float(m.min()) for m in mels.values())
    high = max(float(m.max()) for m in mels.values())
    fig = Figure(figsize=(7, 1.8 * len(mels) + 0.4), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(mels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, mel) in zip(axes, mels.items()):
        image = ax.imshow(mel.T, origin="lower", aspect="auto", cmap="magma", vmin=low, vmax=high)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("mel bin")
    axes[-1].set_xlabel(f"frame ({frame_ms:.3g} ms)")
    fig.colorbar(image, ax=list(axes), label="log mel")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
