"""Export for serving: HF ``Qwen2ForCausalLM`` export/import, the TensorRT-LLM checkpoint writer with
its quantization modes, a pure-torch reference forward that reads the written checkpoint, and the
``trtllm-build`` launcher. No Dagster here (``assets/export.py`` is the Dagster face)."""
