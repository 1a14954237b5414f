"""CosyVoice1 text ids: openai-whisper's multilingual tiktoken, as upstream's recipe tokenizes.

The oracle (``data/upstream_whisper_ids.json``) was recorded by ``record_whisper_ids.py`` through
upstream's own recipe loading and ``processor.tokenize``.
"""

from __future__ import annotations

import json
import os

import pytest

from cosyvoice.config import load_recipe
from cosyvoice.dataset import text as text_module
from cosyvoice.dataset.pipeline import PipelineConfig
from cosyvoice.dataset.processors import tokenize
from cosyvoice.dataset.text import WhisperTextTokenizer, get_whisper_tokenizer, whisper_vocabulary_file

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
UPSTREAM_V1 = os.path.join(ROOT, "tests", "llm", "data", "upstream_cosyvoice.yaml")
V1_TINY = os.path.join(ROOT, "configs", "cosyvoice-tiny.yaml")
MODELS = {k: None for k in ("llm", "flow", "hift", "hifigan")}

needs_vocabulary = pytest.mark.skipif(not os.path.exists(whisper_vocabulary_file()),
                                      reason=f"{whisper_vocabulary_file()} (openai-whisper's multilingual tiktoken "
                                             "file) is not installed")


@pytest.fixture(scope="module")
def oracle() -> list[tuple[str, list[int]]]:
    with open(os.path.join(HERE, "data", "upstream_whisper_ids.json"), encoding="utf-8") as f:
        recorded = json.load(f)
    assert recorded["allowed_special"] == "all"
    return [(text, ids) for text, ids in recorded["cases"]]


@needs_vocabulary
def test_our_text_ids_equal_upstreams_including_special_token_strings(oracle):
    rows = list(tokenize(({"text": text} for text, _ in oracle), tokenizer=WhisperTextTokenizer()))
    assert [row["text_token"] for row in rows] == [ids for _, ids in oracle]
    assert any(50257 in ids for _, ids in oracle)  # '<|endoftext|>' in the text is the special id (no SOT/EOT added)
    # upstream's recipe, loaded unchanged, builds the same tokenizer through its get_tokenizer entry
    recipe_tokenizer = load_recipe(UPSTREAM_V1, MODELS)["get_tokenizer"]()
    assert [recipe_tokenizer.encode(text) for text, _ in oracle] == [ids for _, ids in oracle]


def test_a_missing_vocabulary_file_names_where_it_belongs(tmp_path, monkeypatch):
    missing = str(tmp_path / "assets" / "multilingual.tiktoken")
    monkeypatch.setattr(text_module, "whisper_vocabulary_file", lambda: missing)
    with pytest.raises(FileNotFoundError, match="multilingual.tiktoken") as info:
        WhisperTextTokenizer()
    assert missing in str(info.value) and "openai-whisper" in str(info.value)


@pytest.mark.parametrize("old,new,match", [
    ("language: 'en'", "language: 'zh'", "not supported"),
    ("allowed_special: 'all'", "allowed_special: 'none_raise'", "allowed_special"),
])
def test_whisper_settings_the_pipeline_would_not_honour_are_refused(tmp_path, old, new, match):
    path = tmp_path / "cosyvoice.yaml"
    text = open(V1_TINY).read()
    assert old in text
    path.write_text(text.replace(old, new))
    with pytest.raises(ValueError, match=match):
        PipelineConfig.from_recipe(load_recipe(str(path), MODELS))


def test_the_whisper_face_refuses_other_languages_and_tasks():
    with pytest.raises(ValueError, match="CosyVoice1 uses"):
        get_whisper_tokenizer(task="translate")
