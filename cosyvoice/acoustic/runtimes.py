"""Which acoustic runtime a model dir needs, told by the recipe file it carries (upstream's
``AutoModel`` rule): ``cosyvoice.yaml`` is a CosyVoice1 dir (:class:`Token2WavV1`, 22.05 kHz),
anything else the CosyVoice2 runtime (:class:`Token2Wav`, 24 kHz; it reads ``cosyvoice2.yaml`` or
assumes the released sizes). :func:`load_token2wav` is the Triton ``token2wav`` model's default
factory, so one repository template serves either generation.
"""

from __future__ import annotations

import os

from cosyvoice.acoustic import CONFIG_FILE, CONFIG_FILE_V1

V1, V2 = "cosyvoice", "cosyvoice2"
SAMPLE_RATES = {V1: 22050, V2: 24000}
#: Token2Wav's options the CosyVoice1 runtime has no counterpart for (its flow computes each chunk
#: once by design, and its estimator is not compiled)
V2_ONLY_OPTIONS = ("stream_cache", "chunk_causal_final", "max_stream_cache_bytes", "compile")


def acoustic_generation(model_dir: str) -> str:
    """``"cosyvoice"`` (CosyVoice1) when ``model_dir`` holds ``cosyvoice.yaml``, else ``"cosyvoice2"``."""
    v1 = os.path.isfile(os.path.join(model_dir, CONFIG_FILE_V1))
    if v1 and os.path.isfile(os.path.join(model_dir, CONFIG_FILE)):
        raise ValueError(f"{model_dir}: holds both {CONFIG_FILE_V1} (CosyVoice1) and {CONFIG_FILE} (CosyVoice2); "
                         "a model dir is one generation")
    return V1 if v1 else V2


def sample_rate(model_dir: str) -> int:
    """The output rate of the acoustic models in ``model_dir``."""
    return SAMPLE_RATES[acoustic_generation(model_dir)]


def load_token2wav(model_dir: str, **options):
    """The acoustic runtime for ``model_dir`` with ``options`` (``Token2Wav``'s keywords); an option the
    CosyVoice1 runtime lacks is a ``ValueError`` naming it."""
    if acoustic_generation(model_dir) == V2:
        from cosyvoice.acoustic.token2wav import Token2Wav

        return Token2Wav(model_dir, **options)
    unsupported = sorted(set(options) & set(V2_ONLY_OPTIONS))
    if unsupported:
        raise ValueError(f"{model_dir} is a CosyVoice1 model dir ({CONFIG_FILE_V1}); its runtime has no "
                         f"{', '.join(unsupported)} (CosyVoice2 options): leave them unset")
    from cosyvoice.acoustic.token2wav_v1 import Token2WavV1

    return Token2WavV1(model_dir, **options)
