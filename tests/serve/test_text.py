"""The gateway's text frontend: wetext normalization, upstream's Chinese cleanups and sentence segmentation."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from cosyvoice.serve import text as text_module
from cosyvoice.serve.text import TextFrontend, approx_tokens, contains_chinese

EN_PARAGRAPH = (
    "On the first warm morning of spring, the old farmer walked slowly across his fields to check whether the young "
    "wheat had survived the long and unusually cold winter nights. His daughter followed him with a basket of bread, "
    "cheese and apples, because she knew that he would forget to eat until the sun had set behind the distant hills. "
    "By noon they had counted 12 healthy rows of green wheat, and both of them sat down in the shade and smiled with "
    "relief.")
ZH_PARAGRAPH = (
    "春天的第一个温暖早晨，老农夫慢慢地走过他的田地，想看看年轻的麦苗是否熬过了漫长而寒冷的冬夜。"
    "他的女儿提着一篮面包和苹果跟在后面，因为她知道父亲总是忘记吃饭，直到太阳落到远处的山后。"
    "到了中午，他们数出了12行健康的麦苗，两个人都松了一口气。")


@pytest.fixture(scope="module")
def frontend() -> TextFrontend:
    return TextFrontend()


def test_contains_chinese():
    assert contains_chinese("hello 世界")
    assert not contains_chinese("hello, world! ＡＢＣ ひらがな")


def test_english_paragraph_is_packed_into_llm_sized_segments(frontend):
    assert frontend.segments(EN_PARAGRAPH) == [
        "On the first warm morning of spring, the old farmer walked slowly across his fields to check whether the "
        "young wheat had survived the long and unusually cold winter nights. His daughter followed him with a basket "
        "of bread, cheese and apples, because she knew that he would forget to eat until the sun had set behind the "
        "distant hills.",
        "By noon they had counted twelve healthy rows of green wheat, and both of them sat down in the shade and "
        "smiled with relief.",
    ]


def test_chinese_paragraph_is_packed_by_characters(frontend):
    assert frontend.segments(ZH_PARAGRAPH) == [
        "春天的第一个温暖早晨，老农夫慢慢地走过他的田地，想看看年轻的麦苗是否熬过了漫长而寒冷的冬夜。"
        "他的女儿提着一篮面包和苹果跟在后面，因为她知道父亲总是忘记吃饭，直到太阳落到远处的山后。",
        "到了中午，他们数出了十二行健康的麦苗，两个人都松了一口气。",
    ]


def test_a_short_last_sentence_joins_the_previous_segment():
    frontend = TextFrontend(token_max_n=8, token_min_n=4, merge_len=3)
    assert frontend.segments("one two three four five. six seven eight nine ten. Yes.", normalize=False) == [
        "one two three four five.", "six seven eight nine ten. Yes."]


def test_english_numbers_currency_and_dates_are_verbalized(frontend):
    assert frontend.normalize("I have 3 cats and 1,234 dogs.") == (
        "I have three cats and one thousand two hundred and thirty four dogs.")
    assert frontend.normalize("It costs $1,234.56 on Jan 3, 2024 at 10:30am.") == (
        "It costs one thousand two hundred and thirty four point five six dollars on the third of january, "
        "twenty twenty four at ten thirty AM.")
    assert frontend.normalize("50% off, 3.5 kg, the 2nd place") == (
        "fifty percent off, three point five kilograms, the second place")
    # the wetext "thousand" fix leaves words that were already there alone
    assert frontend.normalize("a thousand and 1,200") == "a thousand and one thousand two hundred"


@pytest.mark.parametrize("raw", ["I am #1 fan.", "№5", "٣ apples", "Room ５０１", "1,234.56", "H2O and x86_64",
                                 "$1,000,000", "1000000000000000000000", "007", "1990s", "12/25/2023",
                                 "call +1 (555) 123-4567", "Mr. Smith at 5 p.m."])
def test_no_digit_survives_english_normalization(frontend, raw):
    out = frontend.normalize(raw)
    assert out and not re.search(r"\d", out), out


def test_wetext_failures_fall_back_to_finer_pieces(frontend, monkeypatch):
    real = text_module._wetext
    monkeypatch.setattr(text_module, "_wetext", lambda lang, s: None if "boom" in s else real(lang, s))
    assert frontend.normalize("The boom lasted 42.5 years. I have 3 cats.") == (
        "The boom lasted forty two point five years. I have three cats.")
    # crash inputs of wetext 0.1.8 itself: "#1" and double spaces
    assert frontend.normalize("I am #1 fan.  Really.") == "I am number one fan. Really."


def test_english_quotes_wide_forms_and_paragraphs(frontend):
    assert frontend.normalize('"Hello," she said.') == '"Hello," she said.'
    assert frontend.normalize("Ｈｅｌｌｏ，ｗｏｒｌｄ！") == "Hello, world!"
    assert frontend.normalize("Chapter One\n\nIt was  a\ncold night") == "Chapter One. It was a cold night"
    assert frontend.segments("Chapter One\n\nIt was  a\ncold night") == ["Chapter One. It was a cold night."]


def test_chinese_numbers_and_upstream_cleanups(frontend):
    assert frontend.normalize("今天是2024年1月3日，气温-5℃，打了50%的折。") == (
        "今天是二零二四年一月三日，气温负五摄氏度，打了百分之五十的折。")
    # blanks only between ASCII words, brackets removed, corner marks read, '.' -> '。', ' - ' and '——' -> '，',
    # trailing comma -> '。', full-width digits read
    assert frontend.normalize("（注意）【重要】 你好 世界 hello world - 面积x² 三——四.再见，") == (
        "注意重要你好世界hello world，面积x平方三，四。再见。")
    assert frontend.normalize("我有３只猫，网址是example.com") == "我有三只猫，网址是example.com"
    assert frontend.normalize("第一段\n\n第二段\n继续") == "第一段。第二段继续"


def test_closing_quotes_stay_with_their_sentence():
    frontend = TextFrontend(token_max_n=6, token_min_n=3, merge_len=1)
    assert frontend.segments('He said "go now." Then she left quickly. "Wait!" he cried', normalize=False) == [
        'He said "go now."', "Then she left quickly.", '"Wait!"', "he cried."]
    assert frontend.segments("他说：“走吧。”她很快就离开了。“等等！”他喊道") == [
        "他说：“走吧。”", "她很快就离开了。", "“等等！”", "他喊道。"]


def test_special_token_text_is_untouched(frontend):
    text = "You are a helpful assistant. Speak 3 times faster.<|endofprompt|> [breath] 42"
    assert frontend.normalize(text) == text
    assert frontend.segments(text) == [text]


@pytest.mark.parametrize("text", ["", "   ", "\n\t ", "...!!", "？！。", "-- ** --"])
def test_nothing_speakable_gives_no_segment(frontend, text):
    assert frontend.segments(text) == []


def test_punctuation_only_sentences_are_dropped(frontend):
    assert frontend.segments("!! Hello there. ... ?!") == ["Hello there."]


def test_long_english_without_punctuation_is_bounded(frontend):
    words = [f"word{chr(97 + i % 26)}" for i in range(500)]
    segments = frontend.segments(" ".join(words), normalize=False)
    assert all(len(approx_tokens(s)) <= frontend.token_max_n for s in segments)
    assert len(segments) == 7  # 501 tokens in balanced pieces, not 80 + ... + a stub
    assert " ".join(segments) == " ".join(words) + "."


def test_long_chinese_is_cut_at_commas_then_characters(frontend):
    clause = "这是一个没有句号的很长的句子"
    segments = frontend.segments("，".join([clause] * 40))
    assert all(len(s) <= frontend.token_max_n for s in segments)
    assert all(s.endswith(("，", "。")) for s in segments)  # cut where the commas are
    assert "".join(segments) == "，".join([clause] * 40) + "。"
    segments = frontend.segments("好" * 1000)
    assert len(segments) == 13 and all(len(s) <= frontend.token_max_n for s in segments)
    assert "".join(segments) == "好" * 1000 + "。"


def test_english_length_uses_the_given_tokenizer():
    calls = []

    def per_character(s: str) -> list:
        calls.append(s)
        return list(s)

    text = "A short one here. Another short one. A third short one."
    assert TextFrontend().segments(text) == [text]
    segments = TextFrontend(per_character, token_max_n=30, token_min_n=15, merge_len=5).segments(text)
    assert calls and segments == ["A short one here.", "Another short one.", "A third short one."]


def test_normalize_false_splits_without_verbalizing(frontend):
    assert frontend.segments("I have 3 cats", normalize=False) == ["I have 3 cats."]


def test_invalid_limits_are_refused():
    with pytest.raises(ValueError):
        TextFrontend(token_max_n=60, token_min_n=60)


def test_concurrent_use_is_consistent(frontend):
    texts = [EN_PARAGRAPH, ZH_PARAGRAPH, "I have 3 cats and 1,234 dogs."] * 3
    expected = [frontend.segments(t) for t in texts]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(frontend.segments, texts)) == expected
