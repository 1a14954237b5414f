"""``cosyvoice-pipeline`` with every rank's micro-batch losses recorded (a test entry point for torchrun).

Each rank appends ``{"loss": ...}`` per micro-batch to ``<model_dir>/micro_losses.rank<R>.jsonl``,
so a test can compare the logged step loss with the losses each rank actually computed.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from cosyvoice import cli  # noqa: E402
from cosyvoice.train.models import LLM  # noqa: E402

_turn = LLM.turn


def _recording(self, part, engines, batch, device):
    out = _turn(self, part, engines, batch, device)
    path = os.path.join(self.opts.model_dir, f"micro_losses.rank{os.environ.get('RANK', '0')}.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps({"loss": float(out["loss"].detach())}) + "\n")
    return out


LLM.turn = _recording

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
