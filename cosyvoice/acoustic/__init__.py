"""CosyVoice2 acoustic models: speech tokens -> mel (flow matching) -> 24 kHz waveform (HiFT).

``token2wav.Token2Wav`` is the runtime the Triton ``token2wav`` model serves; ``flow`` and ``hift``
are the networks, loadable strictly from the released ``flow.pt`` / ``hift.pt``.
"""
