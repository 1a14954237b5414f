"""What the cosyvoice2 BLS decides before any model runs (``cosyvoice.triton.runtime``, no server):
the LLM input ids per mode, where the prompt comes from, and the checks of a cached prompt."""

from __future__ import annotations

import numpy as np
import pytest

from cosyvoice.triton import runtime

ORIGINAL = runtime.ORIGINAL_VOCAB_SIZE
SOS, TASK_ID = 158227, 158228
PROMPT_TEXT = "the reference transcript."
TARGET = "hello there"
CACHED = set(runtime.CACHED_PROMPT_INPUTS)


@pytest.fixture(scope="module")
def tokenizer(hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


def _text_ids(tokenizer, text):
    return tokenizer.encode(text)


def test_zero_shot_is_the_transcript_the_target_and_the_prompt_tokens(tokenizer):
    tokens = np.array([5, 6, 7], dtype=np.int32) + ORIGINAL
    ids = runtime.llm_input_ids(tokenizer, "zero_shot", TARGET, prompt_text=PROMPT_TEXT, prompt_tokens=tokens)
    assert ids.dtype == np.int32 and ids.shape[0] == 1
    np.testing.assert_array_equal(ids, runtime.prompt_ids(tokenizer, PROMPT_TEXT, TARGET, tokens))
    assert ids[0].tolist() == [SOS, *_text_ids(tokenizer, PROMPT_TEXT + TARGET), TASK_ID, *tokens.tolist()]


def test_cross_lingual_drops_the_prompt_text_and_the_prompt_tokens(tokenizer):
    tokens = np.array([5, 6, 7], dtype=np.int32) + ORIGINAL
    ids = runtime.llm_input_ids(tokenizer, "cross_lingual", TARGET, prompt_text=PROMPT_TEXT, prompt_tokens=tokens)
    assert ids.dtype == np.int32
    assert ids[0].tolist() == [SOS, *_text_ids(tokenizer, TARGET), TASK_ID]


def test_instruct2_puts_the_instruction_before_the_target_ending_it_once_with_endofprompt(tokenizer):
    end = tokenizer.convert_tokens_to_ids(runtime.END_OF_PROMPT)
    assert end is not None and end != tokenizer.unk_token_id and ORIGINAL - 20 < end < ORIGINAL  # a text special token
    assert tokenizer.encode(runtime.END_OF_PROMPT) == [end]  # one id, not BPE pieces
    tokens = np.array([5, 6, 7], dtype=np.int32) + ORIGINAL
    instruction = "speak very slowly."
    ids = runtime.llm_input_ids(tokenizer, "instruct2", TARGET, prompt_text=instruction, prompt_tokens=tokens)
    expected = [SOS, *_text_ids(tokenizer, instruction), end, *_text_ids(tokenizer, TARGET), TASK_ID]
    assert ids[0].tolist() == expected
    assert ids[0].tolist().count(end) == 1 and not set(tokens.tolist()) & set(ids[0].tolist())
    # already ended by the caller: not appended again
    again = runtime.llm_input_ids(tokenizer, "instruct2", TARGET, prompt_text=instruction + runtime.END_OF_PROMPT)
    assert again[0].tolist() == expected
    with pytest.raises(ValueError, match="instruct2 needs an instruction in reference_text"):
        runtime.llm_input_ids(tokenizer, "instruct2", TARGET, prompt_text=" ")


def test_instruct2_is_refused_with_a_tokenizer_that_does_not_know_endofprompt():
    class Plain:
        unk_token_id = None

        def convert_tokens_to_ids(self, token):
            return None

    with pytest.raises(ValueError, match=r"no <\|endofprompt\|> token"):
        runtime.llm_input_ids(Plain(), "instruct2", TARGET, prompt_text="whisper")


def test_mode_defaults_to_zero_shot_and_an_unknown_one_is_named():
    assert runtime.parse_mode(None) == runtime.parse_mode(b"") == "zero_shot"
    assert [runtime.parse_mode(m.encode()) for m in runtime.MODES] == list(runtime.MODES)
    with pytest.raises(ValueError, match=r"mode 'instruct': expected one of zero_shot, cross_lingual, instruct2"):
        runtime.parse_mode(b"instruct")


@pytest.mark.parametrize("given, mode, source", [
    ({"reference_wav", "reference_wav_len", "reference_text", "target_text"}, "zero_shot", "reference_wav"),
    ({"reference_wav", "reference_wav_len"}, "cross_lingual", "reference_wav"),
    (CACHED | {"reference_text"}, "zero_shot", "cached"),
    (CACHED, "cross_lingual", "cached"),
    (CACHED | {"reference_text"}, "instruct2", "cached"),
    (set(), "zero_shot", "default"),
    ({"reference_text"}, "zero_shot", "default"),
    ({"reference_text"}, "instruct2", "default"),
])
def test_the_prompt_source_of_a_request(given, mode, source):
    assert runtime.prompt_source(given, mode) == source


@pytest.mark.parametrize("given, mode, message", [
    (CACHED | {"reference_wav", "reference_wav_len", "reference_text"}, "zero_shot",
     "give either reference_wav or a cached prompt (prompt_speech_tokens, prompt_speech_feat, prompt_spk_embedding), "
     "not both (got reference_wav and prompt_speech_tokens, prompt_speech_feat, prompt_spk_embedding)"),
    ({"reference_wav", "reference_wav_len", "prompt_spk_embedding"}, "cross_lingual", "not both"),
    ({"prompt_speech_tokens", "prompt_spk_embedding", "reference_text"}, "zero_shot",
     "incomplete cached prompt: prompt_speech_tokens, prompt_spk_embedding given but prompt_speech_feat missing "
     "(prompt_speech_tokens, prompt_speech_feat, prompt_spk_embedding go together)"),
    ({"reference_wav", "reference_wav_len"}, "zero_shot", "reference_wav needs reference_wav_len and reference_text"),
    ({"reference_wav", "reference_text"}, "cross_lingual", "reference_wav needs reference_wav_len"),
    (CACHED, "zero_shot", "a cached prompt needs reference_text (the transcript of the prompt audio)"),
    (CACHED, "instruct2", "mode instruct2 needs the instruction in reference_text"),
    (set(), "instruct2", "mode instruct2 needs the instruction in reference_text"),
    (set(), "sft", "mode 'sft': expected one of"),
])
def test_contradictory_or_incomplete_requests_are_refused_with_what_is_wrong(given, mode, message):
    with pytest.raises(ValueError) as info:
        runtime.prompt_source(given, mode)
    assert message in str(info.value)


def test_the_llm_prompt_text_is_the_default_speakers_transcript_only_in_its_own_zero_shot():
    assert runtime.llm_prompt_text("zero_shot", "default", "ignored", "speaker 001 text") == "speaker 001 text"
    assert runtime.llm_prompt_text("instruct2", "default", "be cheerful", "speaker 001 text") == "be cheerful"
    assert runtime.llm_prompt_text("zero_shot", "cached", "transcript", "") == "transcript"
    assert runtime.llm_prompt_text("cross_lingual", "reference_wav", None, "") == ""


def test_a_cached_prompt_becomes_llm_ids_and_a_1_to_2_aligned_mel():
    rng = np.random.default_rng(0)
    tokens = np.array([[0, 17, 6560, 3]], dtype=np.int32)
    feat = rng.standard_normal((1, 9, 80)).astype(np.float16)  # an odd frame beyond 2 per token: trimmed
    embedding = rng.standard_normal((1, 192)).astype(np.float16)
    ids, mel, emb = runtime.cached_prompt(tokens, feat, embedding)
    assert ids.dtype == np.int32 and ids.tolist() == [ORIGINAL + 0, ORIGINAL + 17, ORIGINAL + 6560, ORIGINAL + 3]
    assert mel.dtype == np.float32 and mel.shape == (8, 80)
    np.testing.assert_array_equal(mel, feat[0, :8].astype(np.float32))
    assert emb.dtype == np.float32 and emb.shape == (192,)
    np.testing.assert_array_equal(emb, embedding[0].astype(np.float32))
    # without the batch dim (spk2info entries have it, registry prompts may not)
    ids2, mel2, _ = runtime.cached_prompt(tokens[0], feat[0, :6], embedding[0])
    assert ids2.tolist() == ids.tolist()[:3] and mel2.shape == (6, 80)


@pytest.mark.parametrize("tokens, feat, embedding, message", [
    ([[1, 6561]], np.zeros((1, 4, 80)), np.zeros((1, 192)),
     "prompt_speech_tokens: 1 of 2 are not 0-based speech tokens (0..6560); first: 6561 at position 1"),
    ([[ORIGINAL + 1]], np.zeros((1, 2, 80)), np.zeros((1, 192)), "are not 0-based speech tokens"),
    (np.zeros((1, 0), np.int32), np.zeros((1, 2, 80)), np.zeros((1, 192)), "prompt_speech_tokens: expected integer"),
    (np.array([[1.0, 2.0]]), np.zeros((1, 4, 80)), np.zeros((1, 192)), "prompt_speech_tokens: expected integer"),
    ([[1, 2]], np.zeros((1, 4, 81)), np.zeros((1, 192)), "prompt_speech_feat: expected mel frames [1, F, 80]"),
    ([[1, 2]], np.zeros((2, 4, 80)), np.zeros((1, 192)), "prompt_speech_feat: expected mel frames"),
    ([[1, 2]], np.zeros((1, 4, 80)), np.zeros((1, 80)), "prompt_spk_embedding: expected [1, 192], got [1, 80]"),
])
def test_a_bad_cached_prompt_is_refused_naming_the_tensor(tokens, feat, embedding, message):
    with pytest.raises(ValueError) as info:
        runtime.cached_prompt(np.asarray(tokens), feat, embedding)
    assert message in str(info.value)


def test_speed_is_checked_before_any_model_runs():
    assert runtime.parse_speed(None) == 1.0
    assert runtime.parse_speed(np.array([[1.5]], np.float32)) == 1.5
    for bad, message in [(np.array([[9.0]], np.float32), "speed must be within 0.25-4.0"),
                         (np.array([[np.nan]], np.float32), "speed must be within 0.25-4.0"),
                         (np.array([[1.0, 2.0]], np.float32), "speed: one value expected, got 2")]:
        with pytest.raises(ValueError, match=message):
            runtime.parse_speed(bad)


def test_upstreams_three_stop_tokens_end_the_speech():
    """<|eos1|> is the engine's end_id; the two stop rows after it go as stop words, and the BLS cuts
    at whichever comes first (an engine may return the stop token itself)."""
    eos = 158224
    words = runtime.stop_words_list(eos)
    assert words.shape == (1, 2, 2) and words.dtype == np.int32
    assert runtime.parse_stop_words(words) == {eos + 1, eos + 2}
    assert runtime.parse_stop_words(None) == set()
    padded = np.array([[[5, 6, -1], [1, 2, -1]]], np.int32)
    assert runtime.parse_stop_words(padded) == {5, 6}
    with pytest.raises(ValueError, match="only single-token stop words"):
        runtime.parse_stop_words(np.array([[[5, 6], [2, -1]]], np.int32))
    assert runtime.end_of_speech([151663, 151700, eos + 2, 151664], eos) == 2
    assert runtime.end_of_speech([151663, eos], eos) == 1 and runtime.end_of_speech([151663], eos) is None


def test_the_cpu_llm_stand_in_stops_on_a_stop_word():
    """sample_stream with stop_ids ends where the same seeded sampling would emit a stop id."""
    import torch

    class Fixed(torch.nn.Module):  # always the same logits: the sampled sequence depends only on the seed
        def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=1):
            logits = torch.zeros(1, 1, 8)
            logits[0, 0, 3:6] = 5.0
            return type("Out", (), {"logits": logits})()

    free = list(runtime.sample_stream(Fixed(), torch.tensor([[0]]), max_new_tokens=40, end_id=-1, seed=3))
    assert 4 in free  # token 4 is sampled somewhere within 40 steps
    stopped = list(runtime.sample_stream(Fixed(), torch.tensor([[0]]), max_new_tokens=40, end_id=-1, seed=3,
                                         stop_ids={4}))
    assert stopped == free[: free.index(4)]

