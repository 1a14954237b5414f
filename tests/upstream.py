"""Plain re-implementations of the upstream recipe tools, used as oracles by tests and benchmarks.

Written from the documented behaviour (shared/reference/cosyvoice-contracts.md section 1.1), not
copied: glob ``<src>/*/*/*wav``, skip utterances without ``.normalized.txt``, first line of the
text with newlines dropped, outputs in discovery order.
"""

from __future__ import annotations

import glob
import os


def upstream_prepare_data(src_dir: str, des_dir: str, instruct: str = "") -> None:
    utt2wav, utt2text, utt2spk, spk2utt = {}, {}, {}, {}
    for wav in glob.glob(f"{src_dir}/*/*/*wav"):
        txt = wav.replace(".wav", ".normalized.txt")
        if not os.path.exists(txt):
            continue
        with open(txt) as f:
            content = f.readline().replace("\n", "")
        utt = os.path.basename(wav).replace(".wav", "")
        spk = utt.split("_")[0]
        utt2wav[utt], utt2text[utt], utt2spk[utt] = wav, content, spk
        spk2utt.setdefault(spk, []).append(utt)
    os.makedirs(des_dir, exist_ok=True)
    files = {"wav.scp": utt2wav, "text": utt2text, "utt2spk": utt2spk,
             "spk2utt": {k: " ".join(v) for k, v in spk2utt.items()}}
    if instruct:
        files["instruct"] = {k: instruct for k in utt2wav}
    for name, table in files.items():
        with open(os.path.join(des_dir, name), "w") as f:
            for key, value in table.items():
                f.write(f"{key} {value}\n")
