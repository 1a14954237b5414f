"""CosyVoice2 acoustic models: speech tokens -> mel (flow matching) -> 24 kHz waveform (HiFT).

``token2wav.Token2Wav`` is the runtime the Triton ``token2wav`` model serves; ``flow`` and ``hift``
are the networks, loadable strictly from the released ``flow.pt`` / ``hift.pt``. CosyVoice1
(CosyVoice-300M, 22.05 kHz) has its own flow in ``flow_v1`` (``FlowV1Model``, ``load_flow_v1``; its
U-Net in ``estimator_v1``), not yet wired into the runtime.
"""

#: what the runtime loads from a model dir (flow, vocoder) and the recipe giving their sizes (without
#: it the released full-size settings are assumed)
FLOW_FILE = "flow.pt"
HIFT_FILE = "hift.pt"
MODEL_FILES = (FLOW_FILE, HIFT_FILE)
CONFIG_FILE = "cosyvoice2.yaml"
#: a CosyVoice1 (CosyVoice-300M) model dir names its recipe so; its flow.pt loads with flow_v1.load_flow_v1
CONFIG_FILE_V1 = "cosyvoice.yaml"
