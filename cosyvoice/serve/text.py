"""The gateway's text frontend: verbalize user text and cut it into segments the LLM can speak.

Why: CosyVoice's LLM was trained on spoken-form text ("twenty five", "二十五") of bounded length; digits,
symbols or a whole article in one request degrade or derail synthesis. This keeps upstream CosyVoice's
``text_normalize(split=True)`` behaviour (wetext TN, the Chinese cleanups, ``split_paragraph``'s greedy
sentence packing) and covers what a public endpoint meets and upstream does not: wetext failing or
misreading some inputs, paragraph breaks, and text without punctuation (upstream sends it as one
unbounded segment; here no segment is longer than ``2 * token_max_n``).
"""

from __future__ import annotations

import math
import re
import threading
import unicodedata
from collections.abc import Callable
from typing import Any

_CHINESE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")

# sentence ends (upstream's lists); a sentence also takes the closing quotes/brackets that follow its end
_EN_STOPS = ".?!;:"
_ZH_STOPS = "。？！；：、.?!;"
_CLOSERS = "\"”’」』)）"
# where an over-long segment may be cut before falling back to spaces, then to characters
_CLAUSE_END = re.compile(r"(?<=[，,、；;：:—])")
_SPACE_END = re.compile(r"(?<=\s)(?=\S)")

_PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")
_EN_SENTENCE_END = re.compile(r"(?<=[.?!;:])\s+")

# full-width sentence punctuation in English text: the ASCII mark and a space, so words stay apart
_EN_WIDE_PUNCTUATION = str.maketrans({"，": ", ", "、": ", ", "。": ". ", "！": "! ", "？": "? ", "；": "; ", "：": ": "})
_ZH_DIGITS = str.maketrans("0123456789", "零一二三四五六七八九")
_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ("", "thousand", "million", "billion", "trillion")
_NUMBER_WORDS = frozenset(_ONES + _TENS[2:] + ["hundred", "oh"] + list(_SCALES[1:]))

_normalizers: dict[str, Any] = {}
_load_lock = threading.Lock()
# kaldifst (under wetext) is pybind code that holds the GIL, so serializing the calls costs nothing and keeps
# us safe from any state it keeps between calls
_tn_lock = threading.Lock()


def contains_chinese(text: str) -> bool:
    """Whether ``text`` has a CJK ideograph: such text takes the Chinese normalizer and is measured in characters."""
    return bool(_CHINESE.search(text))


def has_special_tokens(text: str) -> bool:
    """Upstream's rule: text with ``<|...|>`` tokens (e.g. ``<|endofprompt|>``) is model markup, sent untouched."""
    return "<|" in text and "|>" in text


def approx_tokens(text: str) -> list[str]:
    """Default length measure for English when the LLM's tokenizer is not at hand.

    Approximates a BPE tokenizer: a run of letters counts one piece per 8 letters (common words are one
    token, long rare words several), each digit and each other non-space character one piece.
    """
    return re.findall(r"[^\W\d_]{1,8}|\S", text)


def _normalizer(lang: str) -> Any:
    """wetext's normalizer for ``lang``, loaded on first use (importing wetext reads all its FSTs, ~0.4 s)."""
    found = _normalizers.get(lang)
    if found is None:
        with _load_lock:
            found = _normalizers.get(lang)
            if found is None:
                from wetext import Normalizer

                found = _normalizers[lang] = Normalizer(lang=lang, operator="tn")
    return found


def _wetext(lang: str, text: str) -> str | None:
    """One wetext call; ``None`` when wetext fails (it asserts on e.g. ``#1`` or double spaces)."""
    normalizer = _normalizer(lang)
    try:
        with _tn_lock:
            return normalizer.normalize(text)
    except Exception:  # noqa: BLE001 - any wetext failure falls back to a finer-grained attempt
        return None


def _ascii_digits(text: str) -> str:
    """Every Unicode decimal digit (full-width, Arabic-Indic...) as ASCII: wetext only reads ASCII digits."""
    return "".join(str(unicodedata.decimal(c)) if c.isdecimal() and not c.isascii() else c for c in text)


def _half_width(text: str, *, punctuation: bool) -> str:
    """Full-width ASCII forms (U+FF01..U+FF5E) as ASCII; Chinese keeps its full-width punctuation."""
    out = []
    for c in text:
        code = ord(c)
        if 0xFF01 <= code <= 0xFF5E and (punctuation or c.isalnum()):
            c = chr(code - 0xFEE0)
        elif c == "\u3000" and punctuation:
            c = " "
        out.append(c)
    return "".join(out)


def _is_punctuation_only(text: str) -> bool:
    """Nothing to speak: only punctuation, symbols or spaces (upstream drops these segments)."""
    return all(unicodedata.category(c)[0] in "PSZC" for c in text)


# --- English -------------------------------------------------------------------------------------------------------


def _below_thousand(n: int) -> list[str]:
    words = []
    if n >= 100:
        words += [_ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(_TENS[n // 10])
        n %= 10
        if n:
            words.append(_ONES[n])
    elif n or not words:
        words.append(_ONES[n])
    return words


def _cardinal(digits: str) -> str:
    """English words for a digit string: a cardinal up to the trillions, else (or with a leading 0) digit by digit."""
    if (len(digits) > 1 and digits[0] == "0") or len(digits) > 3 * len(_SCALES):
        return " ".join(_ONES[int(d)] for d in digits)
    n = int(digits)
    if n == 0:
        return "zero"
    words: list[str] = []
    for power in range(len(_SCALES) - 1, -1, -1):
        group = (n // 1000**power) % 1000
        if group:
            words += _below_thousand(group) + ([_SCALES[power]] if power else [])
    return " ".join(words)


def _spell_digits_en(text: str) -> str:
    """Last resort for digits wetext left or could not read: plain cardinals, decimals read digit by digit."""

    def spell(match: re.Match) -> str:
        whole, _, fraction = match.group().partition(".")
        words = _cardinal(whole)
        if fraction:
            words += " point " + " ".join(_ONES[int(d)] for d in fraction)
        return f" {words} "

    return re.sub(r"\d+(?:\.\d+)?", spell, text)


def _restore_leading_one(source: str, out: str) -> str:
    """wetext 0.1.8 reads 1,234 / $1,234.56 / 1234.5 as "thousand two hundred...": put the "one" back.

    Only when the output has more "thousand"s than the input (so they came from digits), and only before a
    "thousand" that no number word or article precedes.
    """
    pattern = re.compile(r"\bthousand\b", re.IGNORECASE)
    if len(pattern.findall(out)) <= len(pattern.findall(source)):
        return out

    def fix(match: re.Match) -> str:
        before = re.search(r"([^\W\d_]+)\W*$", match.string[: match.start()])
        if before and before.group(1).lower() in _NUMBER_WORDS | {"a", "an", "the"}:
            return match.group()
        return "one " + match.group()

    return pattern.sub(fix, out)


def _tn_en(text: str) -> str:
    """wetext on ``text``; where it fails, on each sentence, then on each word; a word it cannot read stays as is."""
    out = _wetext("en", text)
    if out is not None:
        # wetext escapes quotes and backslashes in its output
        return _restore_leading_one(text, re.sub(r'\\(["\\])', r"\1", out))
    sentences = _EN_SENTENCE_END.split(text)
    if len(sentences) > 1:
        return " ".join(_tn_en(s) for s in sentences)
    words = text.split(" ")
    if len(words) > 1:
        return " ".join(_tn_en(w) for w in words)
    return text


def _normalize_en(text: str) -> str:
    text = _half_width(_ascii_digits(text).translate(_EN_WIDE_PUNCTUATION), punctuation=True)
    text = " ".join(text.split())  # wetext fails on double spaces and glues "a.\nb" into "a.b"
    text = re.sub(r"#(?=\d)|№\s*", "number ", text)  # wetext fails on "#1"
    text = _spell_digits_en(_tn_en(text))
    return " ".join(text.split())


# --- Chinese -------------------------------------------------------------------------------------------------------


def _drop_blanks(text: str) -> str:
    """Spaces only separate two ASCII words ("hello world"); next to a Chinese character they are dropped."""

    def keep(match: re.Match) -> str:
        before = match.string[match.start() - 1] if match.start() else ""
        after = match.string[match.end()] if match.end() < len(match.string) else ""
        return " " if before.isascii() and after.isascii() and before and after else ""

    return re.sub(r" +", keep, text)


def _normalize_zh(text: str) -> str:
    text = _half_width(_ascii_digits(text), punctuation=False)
    out = _wetext("zh", text)
    text = (out if out is not None else text).translate(_ZH_DIGITS)  # digits wetext left: read one by one
    text = re.sub(r"[\r\n]+", "", text)
    text = re.sub(r"[^\S\n]", " ", text)
    text = text.replace(" - ", "，")
    text = _drop_blanks(text)
    text = text.replace("²", "平方").replace("³", "立方")
    text = re.sub(r"(?<![0-9A-Za-z])\.|\.(?![0-9A-Za-z])", "。", text)  # keeps "example.com", "Node.js"
    text = re.sub(r"[（）【】`]", "", text).replace("——", "，")
    return re.sub(r"[，,、]+$", "。", text.strip())


# --- the frontend --------------------------------------------------------------------------------------------------


class TextFrontend:
    """Normalizes and segments synthesis text the way CosyVoice's frontend does (thread-safe, stateless).

    ``tokenize`` measures English text in LLM tokens (the gateway passes the LLM tokenizer's ``encode``);
    without it :func:`approx_tokens` estimates. Chinese text is measured in characters, like upstream.
    """

    def __init__(self, tokenize: Callable[[str], list] | None = None, *, token_max_n: int = 80,
                 token_min_n: int = 60, merge_len: int = 20):
        if not 0 < merge_len <= token_min_n < token_max_n:
            raise ValueError("need 0 < merge_len <= token_min_n < token_max_n")
        self.tokenize = tokenize or approx_tokens
        self.token_max_n = token_max_n
        self.token_min_n = token_min_n
        self.merge_len = merge_len

    def normalize(self, text: str) -> str:
        """Spoken form of ``text`` (wetext TN for English or Chinese + upstream's cleanups), one line.

        Paragraphs (blank-line separated) are normalized one by one and each ends with a full stop, so a
        title or a paragraph without final punctuation still ends its sentence; single newlines are spaces
        (English) or dropped (Chinese, like upstream). Text with ``<|...|>`` tokens is returned unchanged.
        """
        if has_special_tokens(text):
            return text
        zh = contains_chinese(text)
        stops, stop = (_ZH_STOPS, "。") if zh else (_EN_STOPS, ".")
        paragraphs = [p for p in (_normalize_zh(p) if zh else _normalize_en(p) for p in _PARAGRAPH_BREAK.split(text))
                      if p]
        for i, paragraph in enumerate(paragraphs[:-1]):
            if paragraph.rstrip(_CLOSERS)[-1:] not in stops:
                paragraphs[i] = paragraph + stop
        return ("" if zh else " ").join(paragraphs)

    def segments(self, text: str, *, normalize: bool = True) -> list[str]:
        """``text`` as the list of segments to synthesize one after the other; ``[]`` when nothing is speakable.

        Sentences (ended by upstream's punctuation, with their closing quotes) are packed greedily like
        upstream's ``split_paragraph``: a segment is closed once it is longer than ``token_min_n`` and the
        next sentence would take it over ``token_max_n``; a last piece shorter than ``merge_len`` joins the
        previous segment. A segment still longer than ``2 * token_max_n`` (a run-on sentence, text without
        punctuation) is cut into balanced pieces of at most ``token_max_n``: at commas, then at spaces, then
        between characters. ``normalize=False`` splits without TN. Text with ``<|...|>`` tokens is one
        segment, untouched (upstream).
        """
        if not text.strip():
            return []
        if has_special_tokens(text):
            return [text]
        if normalize:
            text = self.normalize(text)
        else:
            text = text.strip()
        zh = contains_chinese(text)
        pieces = [s.strip() for seg in self._pack(self._sentences(text, zh), zh) for s in self._bound(seg, zh)]
        return [p for p in pieces if p and not _is_punctuation_only(p)]

    def length(self, text: str, zh: bool) -> int:
        """Upstream's measure: characters for Chinese, tokens for everything else."""
        return len(text) if zh else len(self.tokenize(text))

    @staticmethod
    def _sentences(text: str, zh: bool) -> list[str]:
        stops, stop = (_ZH_STOPS, "。") if zh else (_EN_STOPS, ".")
        if text.rstrip(_CLOSERS)[-1:] not in stops:
            text += stop
        s, c = re.escape(stops), re.escape(_CLOSERS)
        return [t for t in re.findall(rf"[^{s}]*[{s}]+[{c}]*", text) if not _is_punctuation_only(t)]

    def _pack(self, sentences: list[str], zh: bool) -> list[str]:
        segments: list[str] = []
        current = ""
        for sentence in sentences:
            if (self.length(current + sentence, zh) > self.token_max_n
                    and self.length(current, zh) > self.token_min_n):
                segments.append(current)
                current = ""
            current += sentence
        if current:
            if segments and self.length(current, zh) < self.merge_len:
                segments[-1] += current
            else:
                segments.append(current)
        return segments

    def _bound(self, segment: str, zh: bool) -> list[str]:
        if self.length(segment, zh) <= 2 * self.token_max_n:
            return [segment]
        return self._cut(segment, zh, (_CLAUSE_END, _SPACE_END))

    def _cut(self, text: str, zh: bool, splitters: tuple[re.Pattern, ...]) -> list[str]:
        """``text`` in balanced pieces of at most ``token_max_n``, cut where the first splitter allows."""
        total = self.length(text, zh)
        if total <= self.token_max_n:
            return [text]
        n_pieces = math.ceil(total / self.token_max_n)
        if not splitters:  # no comma, no space: equal runs of characters
            size = math.ceil(len(text) / n_pieces)
            return [text[i:i + size] for i in range(0, len(text), size)]
        units = [u for u in splitters[0].split(text) if u]
        if len(units) == 1:
            return self._cut(text, zh, splitters[1:])
        target = math.ceil(total / n_pieces)
        pieces: list[str] = []
        current = ""
        for unit in units:
            if current and self.length(current + unit, zh) > self.token_max_n:
                pieces.append(current)
                current = ""
            current += unit
            if self.length(current, zh) >= target:
                pieces.append(current)
                current = ""
        if current:
            pieces.append(current)
        return [cut for piece in pieces for cut in self._cut(piece, zh, splitters[1:])]
