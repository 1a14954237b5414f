"""Which acoustic runtime a model dir needs: :class:`Token2WavV1` (22.05 kHz) for a CosyVoice1 dir,
else the CosyVoice2 runtime (:class:`Token2Wav`, 24 kHz; it reads ``cosyvoice2.yaml`` or assumes the
released sizes). The families, their recipe file names and rates live in :mod:`cosyvoice.model_family`;
this module only maps them onto runtimes. :func:`load_token2wav` is the Triton ``token2wav`` model's
default factory, so one repository template serves either generation.
"""

from __future__ import annotations

from cosyvoice.model_family import COSYVOICE1, COSYVOICE2, config_file_family

#: the served names of the two acoustic generations (the BLS that drives them) and their output rates
V1, V2 = COSYVOICE1.served_by, COSYVOICE2.served_by
SAMPLE_RATES = {V1: COSYVOICE1.sample_rate, V2: COSYVOICE2.sample_rate}
#: Token2Wav's options the CosyVoice1 runtime has no counterpart for (its flow computes each chunk
#: once by design, and its estimator is not compiled)
V2_ONLY_OPTIONS = ("stream_cache", "chunk_causal_final", "max_stream_cache_bytes", "compile")


def acoustic_generation(model_dir: str) -> str:
    """``"cosyvoice"`` (CosyVoice1) when ``model_dir`` holds ``cosyvoice.yaml``, else ``"cosyvoice2"`` (also
    without any recipe: the CosyVoice2 runtime assumes the released sizes); both recipes are a ValueError."""
    return V1 if config_file_family(model_dir) is COSYVOICE1 else V2


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
        raise ValueError(f"{model_dir} is a CosyVoice1 model dir ({COSYVOICE1.config_file}); its runtime has no "
                         f"{', '.join(unsupported)} (CosyVoice2 options): leave them unset")
    from cosyvoice.acoustic.token2wav_v1 import Token2WavV1

    return Token2WavV1(model_dir, **options)
