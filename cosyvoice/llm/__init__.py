"""The speech-token LLMs: CosyVoice2/3's Qwen2LM and CosyVoice1's TransformerLM (no Dagster, no training-loop code here)."""

from cosyvoice.llm.lm import IGNORE_ID, CosyVoice3LM, LmBatch, Qwen2LM, label_smoothing_loss
from cosyvoice.llm.qwen2 import QWEN2_0_5B, Qwen2Encoder
from cosyvoice.llm.sampling import greedy_sampling, nucleus_sampling, random_sampling, ras_sampling
from cosyvoice.llm.transformer import ConformerEncoder, TransformerEncoder
from cosyvoice.llm.transformer_lm import TransformerLM

__all__ = [
    "IGNORE_ID", "QWEN2_0_5B", "ConformerEncoder", "CosyVoice3LM", "LmBatch", "Qwen2Encoder", "Qwen2LM",
    "TransformerEncoder", "TransformerLM", "greedy_sampling", "label_smoothing_loss", "nucleus_sampling",
    "random_sampling", "ras_sampling",
]
