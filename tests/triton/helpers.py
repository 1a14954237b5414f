"""Test doubles for the Triton tests: an echo acoustic runtime that shows what the token2wav adapter
hands its runtime (the real one, ``cosyvoice.acoustic.token2wav:Token2Wav``, is what the served
repository runs), and a variant recording the factory's keyword options."""

from __future__ import annotations

ORIGINAL_VOCAB_SIZE = 151663
SPEECH_TOKENS = 6561
EOS1 = 158224


class EchoToken2Wav:
    """An acoustic runtime for tests: the "waveform" of a chunk is its speech token ids as floats.

    Follows the token2wav streaming contract: a non-final call covers tokens
    ``[token_offset, len - pre_lookahead)``, the final one ``[token_offset, len)``; it checks
    that chunks of one request id arrive contiguously and that the prompt is consistent.
    """

    PRE_LOOKAHEAD = 3

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.next_offset: dict[str, int] = {}

    def synthesize(self, tokens, prompt_tokens, prompt_feat, embedding, *, token_offset, finalize, request_id):
        import numpy as np

        if prompt_tokens is not None and prompt_feat is not None and len(prompt_feat) != 2 * len(prompt_tokens):
            raise ValueError(f"prompt mel {len(prompt_feat)} frames for {len(prompt_tokens)} tokens")
        if embedding is not None and len(embedding) != 192:
            raise ValueError(f"embedding of {len(embedding)} values")
        if token_offset is None:
            return np.asarray(tokens, dtype=np.float32)
        expected = self.next_offset.get(request_id, 0)
        if token_offset != expected:
            raise ValueError(f"request {request_id}: chunk at offset {token_offset}, expected {expected}")
        end = len(tokens) if finalize else len(tokens) - self.PRE_LOOKAHEAD
        self.next_offset[request_id] = end
        return np.asarray(tokens[token_offset:end], dtype=np.float32)

    def release(self, request_id):
        self.next_offset.pop(request_id, None)


class OptionsEchoToken2Wav(EchoToken2Wav):
    """The echo runtime whose factory also takes keyword options, recorded in ``options``."""

    sample_rate = 24000

    def __init__(self, model_dir: str, **options):
        super().__init__(model_dir)
        self.options = options


class SixteenKilohertzToken2Wav(EchoToken2Wav):
    """A runtime producing another rate than the 24 kHz the token2wav config declares."""

    sample_rate = 16000
