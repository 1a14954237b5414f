"""CosyVoice2 ``Qwen2LM`` and CosyVoice3 ``CosyVoice3LM``: the text -> speech-token language model.

Sequence layout and targets follow contract section 7 exactly (IGNORE_ID -1; CosyVoice2 sos/task in
``llm_embedding``, eos 6561, fill 6563; CosyVoice3 sos/eos/task/fill 6561..6564 in
``speech_embedding``; 5 text : 15 speech bistream interleaving drawn with probability 0.5 when
S/T > 3). State-dict keys equal upstream's so checkpoints load strictly both ways.

Two differences in *how*, not *what*: sequences are assembled with one gather from a per-batch
table of embedding rows instead of many small concatenations, and the decoder/loss run only on
target positions (identical loss, less work). ``packed=True`` concatenates the batch into one row
(no padding compute); the loss per utterance is unchanged.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_ID = -1


@dataclass
class LmBatch:
    """Assembled sequences of one batch: ``index`` rows of the embedding table per sequence,
    ``target`` ids per position (IGNORE_ID where nothing is predicted)."""

    inputs: list[torch.Tensor]  # (L_i, H) each
    targets: list[torch.Tensor]  # (L_i,) each, int64

    @property
    def lengths(self) -> list[int]:
        return [int(t.numel()) for t in self.targets]


def label_smoothing_loss(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Summed KL(smoothed one-hot || softmax(logits)) over positions; plain CE when smoothing is 0."""
    logp = logits.float().log_softmax(dim=-1)
    nll = -logp.gather(1, target[:, None]).squeeze(1)
    if smoothing == 0:
        return nll.sum()
    size = logits.size(-1)
    confidence, off = 1.0 - smoothing, smoothing / (size - 1)
    # sum_k t_k (log t_k - logp_k) with t = off everywhere except confidence at the target
    entropy_term = confidence * math.log(confidence) + (size - 1) * off * math.log(off)
    cross = confidence * nll + off * (-logp.sum(dim=-1) + logp.gather(1, target[:, None]).squeeze(1))
    return (entropy_term + cross).sum()


class Qwen2LM(nn.Module):
    def __init__(self, llm_input_size: int, llm_output_size: int, speech_token_size: int, llm: nn.Module,
                 sampling: Callable | None = None, length_normalized_loss: bool = True, lsm_weight: float = 0.0,
                 mix_ratio: Sequence[int] = (5, 15)):
        super().__init__()
        self.llm_input_size = llm_input_size
        self.llm_output_size = llm_output_size
        self.speech_token_size = speech_token_size
        self.sos, self.task_id = 0, 1
        self.eos_token = speech_token_size
        self.fill_token = speech_token_size + 2
        self.llm_embedding = nn.Embedding(2, llm_input_size)
        self.llm = llm
        self.llm_decoder = nn.Linear(llm_output_size, speech_token_size + 3)
        self.speech_embedding = nn.Embedding(speech_token_size + 3, llm_input_size)
        self.stop_token_ids = [speech_token_size + i for i in range(3)]
        self._init_common(sampling, length_normalized_loss, lsm_weight, mix_ratio)

    def _init_common(self, sampling, length_normalized_loss, lsm_weight, mix_ratio) -> None:
        self.sampling = sampling
        self.length_normalized_loss = length_normalized_loss
        self.lsm_weight = lsm_weight
        self.mix_ratio = list(mix_ratio)
        self.packed = False  # set by the trainer (token-budget batches)
        self.speech_token_extractor = None  # set by the trainer for online features (--onnx_path)
        self.last_stats: dict[str, int] = {}

    # -- special rows --------------------------------------------------------------------------
    def special_embeddings(self) -> torch.Tensor:
        """Rows (sos, task_id) of the table the sequences are gathered from."""
        return self.llm_embedding.weight[[self.sos, self.task_id]]

    def uses_instruct(self) -> bool:
        return False

    # -- sequence assembly ---------------------------------------------------------------------
    def _layout(self, text_len: int, speech: list[int], instruct_len: int, bistream: bool,
                text_at: int, speech_at: int, instruct_at: int) -> tuple[list[int], list[int]]:
        """Table row indices and targets for one utterance (table rows: 0 sos, 1 task_id, then the
        utterance's text rows from ``text_at``, speech rows from ``speech_at``, instruct from ``instruct_at``)."""
        n_text, n_speech = self.mix_ratio
        rows = [0] + list(range(instruct_at, instruct_at + instruct_len))
        target = [IGNORE_ID] * (1 + instruct_len)
        if not bistream:
            rows += list(range(text_at, text_at + text_len)) + [1] + list(range(speech_at, speech_at + len(speech)))
            target += [IGNORE_ID] * text_len + speech + [self.eos_token]
            return rows, target
        for j in range(math.ceil((text_len + 1) / n_text)):
            t0, t1 = j * n_text, min((j + 1) * n_text, text_len)
            s0 = j * n_speech
            rows += list(range(text_at + t0, text_at + t1))
            if t1 - t0 == n_text:
                rows += list(range(speech_at + s0, speech_at + s0 + n_speech))
                target += [IGNORE_ID] * (n_text - 1) + speech[s0:s0 + n_speech] + [self.fill_token]
            else:
                rows += [1] + list(range(speech_at + s0, speech_at + len(speech)))
                target += [IGNORE_ID] * (t1 - t0) + speech[s0:] + [self.eos_token]
        return rows, target

    def prepare_sequences(self, text_token: torch.Tensor, text_token_len: torch.Tensor, speech_token: torch.Tensor,
                          speech_token_len: torch.Tensor, instruct_token: torch.Tensor | None = None,
                          instruct_token_len: torch.Tensor | None = None) -> LmBatch:
        """Per-utterance input embeddings and targets (contract 7.2). One ``random.random()`` draw per
        utterance, as upstream, so seeded runs reproduce the bistream/unistream choice."""
        text_lens = text_token_len.tolist()
        speech_lens = speech_token_len.tolist()
        instruct_lens = instruct_token_len.tolist() if instruct_token is not None else [0] * len(text_lens)
        embed_text = self.llm.embed_tokens
        texts = [text_token[i, :n] for i, n in enumerate(text_lens)]
        speeches = [speech_token[i, :n] for i, n in enumerate(speech_lens)]
        instructs = [instruct_token[i, :n] for i, n in enumerate(instruct_lens)] if instruct_token is not None else []
        parts = [self.special_embeddings(), embed_text(torch.cat(texts)), self.speech_embedding(torch.cat(speeches))]
        if instructs:
            parts.append(embed_text(torch.cat(instructs)))
        table = torch.cat(parts, dim=0)
        text_at, speech_at = 2, 2 + sum(text_lens)
        instruct_at = speech_at + sum(speech_lens)
        inputs, targets = [], []
        n_text, n_speech = self.mix_ratio
        for i, (t, s) in enumerate(zip(text_lens, speech_lens)):
            bistream = random.random() < 0.5 and (s / t if t else math.inf) > n_speech / n_text
            rows, target = self._layout(t, speeches[i].tolist(), instruct_lens[i], bistream,
                                        text_at, speech_at, instruct_at)
            inputs.append(table[torch.tensor(rows, device=table.device)])
            targets.append(torch.tensor(target, dtype=torch.long, device=table.device))
            text_at, speech_at, instruct_at = text_at + t, speech_at + s, instruct_at + instruct_lens[i]
        return LmBatch(inputs, targets)

    def prepare_lm_input_target(self, *args, **kwargs):
        """Upstream-shaped result: (targets padded with IGNORE, inputs padded with -1.0, lengths int32)."""
        seq = self.prepare_sequences(*args, **kwargs)
        lengths = torch.tensor(seq.lengths, dtype=torch.int32)
        inputs = nn.utils.rnn.pad_sequence(seq.inputs, batch_first=True, padding_value=IGNORE_ID)
        targets = nn.utils.rnn.pad_sequence(seq.targets, batch_first=True, padding_value=IGNORE_ID)
        return targets, inputs, lengths

    # -- forward ---------------------------------------------------------------------------------
    def _hidden(self, seq: LmBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hidden states at target positions, their targets and their sequence index."""
        lengths = seq.lengths
        if self.packed:
            x = torch.cat(seq.inputs)[None]
            positions = torch.cat([torch.arange(n, device=x.device) for n in lengths])[None]
            hidden = self.llm.forward_packed(x, positions)[0]
            target = torch.cat(seq.targets)
        else:
            x = nn.utils.rnn.pad_sequence(seq.inputs, batch_first=True, padding_value=IGNORE_ID)
            hidden, _ = self.llm(x, torch.tensor(lengths, device=x.device))
            target = nn.utils.rnn.pad_sequence(seq.targets, batch_first=True, padding_value=IGNORE_ID)
            hidden, target = hidden.reshape(-1, hidden.size(-1)), target.reshape(-1)
        per_seq = torch.tensor(lengths, device=hidden.device) if self.packed else max(lengths)
        owner = torch.arange(len(lengths), device=hidden.device).repeat_interleave(per_seq)
        keep = target != IGNORE_ID
        self.last_stats = {"tokens": int(sum(lengths)), "padded_tokens": int(target.numel()),
                           "target_tokens": int(keep.sum())}
        return hidden[keep], target[keep], owner[keep]

    def _loss(self, logits: torch.Tensor, target: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        total = label_smoothing_loss(logits, target, self.lsm_weight)
        denom = target.numel() if self.length_normalized_loss else batch_size
        acc = (logits.argmax(dim=-1) == target).float().mean().detach()
        return total / max(denom, 1), acc

    def _speech_tokens(self, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
        if "speech_token" in batch:
            return batch["speech_token"].to(device), batch["speech_token_len"].to(device)
        if self.speech_token_extractor is None:
            raise ValueError("batch has no speech_token and no online tokenizer is configured (--onnx_path)")
        return self.speech_token_extractor(batch["whisper_feat"], batch["whisper_feat_len"], device)

    def _instruct(self, batch: dict, device):
        if not self.uses_instruct():
            return None, None
        if "instruct_token" not in batch:
            raise ValueError(f"{type(self).__name__} needs `instruct` in every training row (contract 6.3)")
        return batch["instruct_token"].to(device), batch["instruct_token_len"].to(device)

    def forward(self, batch: dict, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        text_token, text_len = batch["text_token"].to(device), batch["text_token_len"].to(device)
        speech_token, speech_len = self._speech_tokens(batch, device)
        instruct, instruct_len = self._instruct(batch, device)
        seq = self.prepare_sequences(text_token, text_len, speech_token, speech_len, instruct, instruct_len)
        hidden, target, _ = self._hidden(seq)
        loss, acc = self._loss(self.llm_decoder(hidden), target, text_token.size(0))
        return {"loss": loss, "acc": acc}

    def forward_dpo(self, batch: dict, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """SFT loss on the chosen sequences plus mean log-probabilities of chosen and rejected
        sequences over their target positions (speech tokens and the closing eos/fill), for the
        rows that have rejected tokens; rows without are counted in ``dpo_skipped``."""
        text_token, text_len = batch["text_token"].to(device), batch["text_token_len"].to(device)
        chosen, chosen_len = batch["speech_token"].to(device), batch["speech_token_len"].to(device)
        rejected, rejected_len = batch["reject_speech_token"].to(device), batch["reject_speech_token_len"].to(device)
        instruct, instruct_len = self._instruct(batch, device)
        pairs = torch.nonzero(rejected_len > 0).flatten()
        b, p = text_token.size(0), pairs.numel()
        width = max(chosen.size(1), rejected.size(1))
        speech = torch.cat([F.pad(chosen, (0, width - chosen.size(1))), F.pad(rejected[pairs], (0, width - rejected.size(1)))])
        speech_len = torch.cat([chosen_len, rejected_len[pairs]])
        text_all = torch.cat([text_token, text_token[pairs]])
        text_len_all = torch.cat([text_len, text_len[pairs]])
        if instruct is not None:
            instruct = torch.cat([instruct, instruct[pairs]])
            instruct_len = torch.cat([instruct_len, instruct_len[pairs]])
        seq = self.prepare_sequences(text_all, text_len_all, speech, speech_len, instruct, instruct_len)
        hidden, target, owner = self._hidden(seq)
        logits = self.llm_decoder(hidden)
        is_chosen = owner < b
        loss, acc = self._loss(logits[is_chosen], target[is_chosen], b)
        token_logp = logits.float().log_softmax(-1).gather(1, target[:, None]).squeeze(1)
        n_seq = b + p
        sums = torch.zeros(n_seq, device=logits.device).index_add(0, owner, token_logp)
        counts = torch.zeros(n_seq, device=logits.device).index_add(0, owner, torch.ones_like(token_logp))
        mean_logp = sums / counts.clamp(min=1)
        return {"loss": loss, "acc": acc, "chosen_logps": mean_logp[pairs], "rejected_logps": mean_logp[b:],
                "dpo_skipped": torch.tensor(b - p, device=logits.device)}

    # -- inference -------------------------------------------------------------------------------
    def sampling_ids(self, weighted_scores: torch.Tensor, decoded_tokens: list[int], sampling, ignore_eos: bool = True) -> int:
        if ignore_eos:
            weighted_scores = weighted_scores.clone()
            weighted_scores[self.eos_token] = -float("inf")
        return self.sampling(weighted_scores, decoded_tokens, sampling)

    def check_inference_text(self, text: torch.Tensor) -> None:
        pass

    @torch.inference_mode()
    def inference(self, text: torch.Tensor, text_len: torch.Tensor, prompt_text: torch.Tensor, prompt_text_len: torch.Tensor,
                  prompt_speech_token: torch.Tensor, prompt_speech_token_len: torch.Tensor, embedding: torch.Tensor | None = None,
                  sampling: int = 25, max_token_text_ratio: float = 20, min_token_text_ratio: float = 2,
                  uuid: str = "") -> Iterator[int]:
        """Unistream decoding: ``[sos] [prompt text + text] [task_id] [prompt speech]`` then one token
        per step until a stop id; between ``2x`` and ``20x`` the (non-prompt) text length."""
        text_all = torch.cat([prompt_text, text], dim=1)
        self.check_inference_text(text_all)
        special = self.special_embeddings()
        parts = [special[:1], self.llm.embed_tokens(text_all[0]), special[1:2]]
        if int(prompt_speech_token_len.reshape(-1)[0]) > 0:
            parts.append(self.speech_embedding(prompt_speech_token[0]))
        lm_input = torch.cat(parts)[None]
        n_text = int(text_len.reshape(-1)[0])
        min_len, max_len = int(n_text * min_token_text_ratio), int(n_text * max_token_text_ratio)
        yield from self.decode(lm_input, sampling, min_len, max_len)

    def decode(self, lm_input: torch.Tensor, sampling, min_len: int, max_len: int) -> Iterator[int]:
        out: list[int] = []
        cache = None
        for i in range(max_len):
            hidden, cache = self.llm.forward_one_step(lm_input, cache)
            logp = self.llm_decoder(hidden[:, -1]).log_softmax(dim=-1)[0]
            token = self.sampling_ids(logp, out, sampling, ignore_eos=i < min_len)
            if token in self.stop_token_ids:
                return
            yield token
            out.append(token)
            lm_input = self.speech_embedding.weight[token].reshape(1, 1, -1)


class CosyVoice3LM(Qwen2LM):
    """sos/eos/task/fill are speech-vocabulary rows 6561..6564 (200 extra rows), no ``llm_embedding``,
    decoder without bias, instruct tokens after sos."""

    END_OF_PROMPT = 151646  # <|endofprompt|> in the CosyVoice3 text tokenizer

    def __init__(self, llm_input_size: int, llm_output_size: int, speech_token_size: int, llm: nn.Module,
                 sampling: Callable | None = None, length_normalized_loss: bool = True, lsm_weight: float = 0.0,
                 mix_ratio: Sequence[int] = (5, 15)):
        nn.Module.__init__(self)
        self.llm_input_size = llm_input_size
        self.llm_output_size = llm_output_size
        self.speech_token_size = speech_token_size
        self.sos, self.eos_token = speech_token_size, speech_token_size + 1
        self.task_id, self.fill_token = speech_token_size + 2, speech_token_size + 3
        self.llm = llm
        self.llm_decoder = nn.Linear(llm_output_size, speech_token_size + 200, bias=False)
        self.speech_embedding = nn.Embedding(speech_token_size + 200, llm_input_size)
        self.stop_token_ids = [speech_token_size + i for i in range(200)]
        self._init_common(sampling, length_normalized_loss, lsm_weight, mix_ratio)

    def special_embeddings(self) -> torch.Tensor:
        return self.speech_embedding.weight[[self.sos, self.task_id]]

    def uses_instruct(self) -> bool:
        return True

    def check_inference_text(self, text: torch.Tensor) -> None:
        if not bool((text == self.END_OF_PROMPT).any()):
            raise ValueError("CosyVoice3 input text needs <|endofprompt|> (id 151646) in the text or prompt text")
