"""CosyVoice2 acoustic models: speech tokens -> mel (flow matching) -> 24 kHz waveform (HiFT).

``token2wav.Token2Wav`` is the runtime the Triton ``token2wav`` model serves; ``flow`` and ``hift``
are the networks, loadable strictly from the released ``flow.pt`` / ``hift.pt``.
"""

#: what the runtime loads from a model dir (flow, vocoder) and the recipe giving their sizes (without
#: it the released full-size settings are assumed)
FLOW_FILE = "flow.pt"
HIFT_FILE = "hift.pt"
MODEL_FILES = (FLOW_FILE, HIFT_FILE)
CONFIG_FILE = "cosyvoice2.yaml"
