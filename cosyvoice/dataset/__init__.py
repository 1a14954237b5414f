"""Streaming training data: shard sampling across ranks/workers and the CosyVoice processing stages."""
