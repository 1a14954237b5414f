"""Record upstream's CosyVoice1 text ids as a test oracle (``tests/dataset/data/upstream_whisper_ids.json``).

Upstream's own path: its v1 recipe ``examples/libritts/cosyvoice/conf/cosyvoice.yaml`` loaded by
HyperPyYAML (``get_tokenizer: !name:whisper.tokenizer.get_tokenizer`` + ``allowed_special: 'all'``)
and its ``cosyvoice.dataset.processor.tokenize`` run over a few texts (plain, punctuation, non-ASCII,
whitespace, whisper special-token strings, empty). ``tests/dataset/test_whisper_text.py`` compares ours.

    PYTHONPATH=/path/to/upstream-deps python tests/dataset/record_whisper_ids.py --upstream_src ~/src/CosyVoice
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "dataset", "data", "upstream_whisper_ids.json")
RECIPE = os.path.join("examples", "libritts", "cosyvoice", "conf", "cosyvoice.yaml")

TEXTS = [
    "Hello world.",
    "The quick brown fox, born in 1984, jumped over 3.5 lazy dogs!",
    "  leading and trailing spaces  ",
    "naïve café — “quoted” text… déjà vu",
    "中文和 English 混合",
    "<|endoftext|> a special token <|en|><|transcribe|><|notimestamps|>",
    "[laughter] and <strong>emphasis</strong>",
    "",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream_src", required=True, help="a FunAudioLLM/CosyVoice checkout")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    src = os.path.abspath(args.upstream_src)
    # upstream's package is also called cosyvoice: it must win in this process (Matcha-TTS: the recipe names it)
    sys.path[:0] = [src, os.path.join(src, "third_party", "Matcha-TTS")]
    from hyperpyyaml import load_hyperpyyaml

    from cosyvoice.dataset import processor

    with open(os.path.join(src, RECIPE)) as f:
        configs = load_hyperpyyaml(f, overrides={k: None for k in ("llm", "flow", "hift", "hifigan")})
    rows = processor.tokenize(({"text": t} for t in TEXTS), configs["get_tokenizer"], configs["allowed_special"])
    ids = [list(map(int, row["text_token"])) for row in rows]
    cases = ",\n".join(f"  {json.dumps([text, row], ensure_ascii=False)}" for text, row in zip(TEXTS, ids))
    with open(args.out, "w", encoding="utf-8") as f:  # one [text, ids] case per line
        f.write(f'{{"recipe": {json.dumps(RECIPE)}, "allowed_special": {json.dumps(configs["allowed_special"])},\n'
                f' "cases": [\n{cases}\n ]}}\n')
    print(f"{len(ids)} texts -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
