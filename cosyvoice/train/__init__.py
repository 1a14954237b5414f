"""Training of the CosyVoice2/3 LLM: one loop, two engines (torch DDP, DeepSpeed), SFT and DPO.

Importable without Dagster (the GPU image carries only this package and its torch stack).
"""
