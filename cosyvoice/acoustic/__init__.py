"""CosyVoice acoustic models: speech tokens -> mel (flow matching) -> waveform (HiFT).

CosyVoice2: ``token2wav.Token2Wav`` (25 Hz tokens, 24 kHz) over ``flow`` and ``hift``, loadable strictly
from the released ``flow.pt`` / ``hift.pt``. CosyVoice1 (CosyVoice-300M): ``token2wav_v1.Token2WavV1``
(50 Hz tokens, 22.05 kHz) over its own flow in ``flow_v1`` (``FlowV1Model``, ``load_flow_v1``; its U-Net
in ``estimator_v1``) and the same HiFT at 22.05 kHz. ``runtimes.load_token2wav`` picks one by the model
dir's recipe file (``cosyvoice.yaml``: CosyVoice1); the Triton ``token2wav`` model, ``synthesize`` and
the published sample preview all load through it.
"""

#: what the runtime loads from a model dir (flow, vocoder) and the recipe giving their sizes (without
#: it the released full-size settings are assumed)
FLOW_FILE = "flow.pt"
HIFT_FILE = "hift.pt"
MODEL_FILES = (FLOW_FILE, HIFT_FILE)
CONFIG_FILE = "cosyvoice2.yaml"
#: a CosyVoice1 (CosyVoice-300M) model dir names its recipe so; its flow.pt loads with flow_v1.load_flow_v1
CONFIG_FILE_V1 = "cosyvoice.yaml"
