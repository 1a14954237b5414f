"""Online features for training (``--onnx_path DIR``), like upstream's ``cosyvoice/utils/onnx.py``.

Speech tokens for batches without a ``speech_token`` column, from the ``whisper_feat`` the data
pipeline computes: ``speech_tokenizer_v{2,3}.batch.onnx`` when the directory has it (one call per
batch), else the single-utterance ``speech_tokenizer_v{2,3}.onnx`` row by row (same codes).
CAM++ embeddings for rows without embedding columns are computed in the data pipeline
(``PipelineConfig.campplus_onnx``).
"""

from __future__ import annotations

import os

import numpy as np
import torch


class OnlineSpeechTokenizer:
    def __init__(self, path: str, batched: bool):
        from cosyvoice.features.onnx import make_session

        self.path = path
        self.batched = batched
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.session = make_session(path, device=device)

    @classmethod
    def for_model(cls, onnx_dir: str, model) -> OnlineSpeechTokenizer:
        version = "v3" if type(model).__name__ == "CosyVoice3LM" else "v2"
        batch = os.path.join(onnx_dir, f"speech_tokenizer_{version}.batch.onnx")
        single = os.path.join(onnx_dir, f"speech_tokenizer_{version}.onnx")
        if os.path.exists(batch):
            return cls(batch, batched=True)
        if os.path.exists(single):
            return cls(single, batched=False)
        raise FileNotFoundError(f"--onnx_path {onnx_dir}: needs speech_tokenizer_{version}.batch.onnx "
                                f"(or speech_tokenizer_{version}.onnx) for online speech tokens")

    def __call__(self, whisper_feat: torch.Tensor, whisper_feat_len: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        feats = whisper_feat.transpose(1, 2).float().cpu().numpy()  # (B, 128, T)
        lengths = whisper_feat_len.cpu().numpy().astype(np.int32)
        token_len = lengths // 4  # 25 Hz tokens from 100 Hz mel (upstream computes len / 4)
        if self.batched:
            indices = self.session.run(None, {"feats": feats, "feats_length": lengths})[0]
            rows = [indices[i, :n] for i, n in enumerate(token_len)]
        else:
            rows = []
            for i, n in enumerate(lengths):
                codes = self.session.run(None, {"feats": feats[i:i + 1, :, :n], "feats_length": lengths[i:i + 1]})[0]
                rows.append(codes[0, :token_len[i]])
        width = max(int(token_len.max()), 1)
        out = torch.zeros(len(rows), width, dtype=torch.int64)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.from_numpy(np.asarray(r, dtype=np.int64))
        return out.to(device), torch.from_numpy(token_len).to(device)
