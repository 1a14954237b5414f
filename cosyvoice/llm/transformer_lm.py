"""CosyVoice1's ``TransformerLM``: text (whisper BPE ids) + speaker vector -> 50 Hz speech tokens (v1, 4096 codes).

The sequence layout and targets are contract section 7.1: per utterance
``[sos] [speaker] [encoded text x T] [task_id] [speech x S]`` with targets ``IGNORE x (2 + T)``, the
S speech tokens, then eos (= ``speech_token_size``, 4096 in the recipe); sos/task_id are rows 0/1 of
``llm_embedding``; the speaker row is ``spk_embed_affine_layer(normalize(embedding))``. The text
goes through the (causal) Conformer ``text_encoder`` and ``text_encoder_affine_layer`` first, and
the whole sequence through the causal Transformer ``llm``. Module names and registration order are
upstream's, so ``llm.pt`` loads strictly both ways.

Training runs the padded batch as upstream does (same shapes, so a seeded train-mode step draws
the same dropout masks); the decoder and the loss run on target positions only (same loss).
Generation keeps a key/value cache (:meth:`TransformerEncoder.extend`) instead of upstream's
``forward_chunk`` with its per-step positional re-projection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice.llm.lm import IGNORE_ID, label_smoothing_loss
from cosyvoice.llm.transformer import RelPositionEncoder


class TransformerLM(nn.Module):
    def __init__(self, text_encoder_input_size: int, llm_input_size: int, llm_output_size: int, text_token_size: int,
                 speech_token_size: int, text_encoder: RelPositionEncoder, llm: RelPositionEncoder,
                 sampling: Callable | None = None, length_normalized_loss: bool = True, lsm_weight: float = 0.0,
                 spk_embed_dim: int = 192):
        super().__init__()
        self.llm_input_size = llm_input_size
        self.llm_output_size = llm_output_size
        self.text_token_size = text_token_size
        self.speech_token_size = speech_token_size
        # registration order = upstream's state-dict order
        self.text_embedding = nn.Embedding(text_token_size, text_encoder_input_size)
        self.text_encoder = text_encoder
        self.text_encoder_affine_layer = nn.Linear(text_encoder.output_size(), llm_input_size)
        self.sos, self.task_id = 0, 1
        self.eos_token = speech_token_size
        self.stop_token_ids = [self.eos_token]
        self.llm_embedding = nn.Embedding(2, llm_input_size)
        self.llm = llm
        self.llm_decoder = nn.Linear(llm_output_size, speech_token_size + 1)
        self.speech_embedding = nn.Embedding(speech_token_size, llm_input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, llm_input_size)
        self.sampling = sampling
        self.length_normalized_loss = length_normalized_loss
        self.lsm_weight = lsm_weight
        self.last_stats: dict[str, int] = {}

    # -- pieces shared by training and generation ------------------------------------------------
    def encode(self, text_token: torch.Tensor, text_len: torch.Tensor) -> torch.Tensor:
        """Text ids (B, T) -> LLM-space rows (B, T, llm_input_size) through the causal text encoder."""
        text_token = self._valid_ids(text_token, text_len, self.text_token_size, "text token")
        encoded, _ = self.text_encoder(self.text_embedding(text_token), text_len, decoding_chunk_size=1,
                                       num_decoding_left_chunks=-1)
        return self.text_encoder_affine_layer(encoded)

    def speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        """Speaker vectors (B, spk_embed_dim) -> one LLM-space row each (B, llm_input_size)."""
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=1))

    @staticmethod
    def _valid_ids(ids: torch.Tensor, lengths: torch.Tensor, size: int, what: str) -> torch.Tensor:
        """``ids`` with the padding set to 0 (the pipeline pads with 0), after a clear error for a real id
        the embedding table does not have (e.g. v2 speech tokens in a v1 batch)."""
        real = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
        bad = ids[real & ((ids < 0) | (ids >= size))]
        if bad.numel():
            raise ValueError(f"{what} id {int(bad[0])} is outside this model's vocabulary [0, {size}) "
                             f"(CosyVoice1 speech tokens are v1 codes < 4096; v2/v3 tokens go to Qwen2LM)")
        return ids.masked_fill(~real, 0)

    # -- training ----------------------------------------------------------------------------------
    def prepare_lm_input_target(self, text_token: torch.Tensor, text_len: torch.Tensor, speech_token: torch.Tensor,
                                speech_len: torch.Tensor, embedding: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(targets padded with IGNORE_ID, inputs (B, L, D) padded with -1.0, lengths int32), contract 7.1."""
        speech_token = self._valid_ids(speech_token, speech_len, self.speech_token_size, "speech token")
        text = self.encode(text_token, text_len)
        spk = self.speaker(embedding)
        speech = self.speech_embedding(speech_token)
        sos, task = self.llm_embedding.weight[self.sos], self.llm_embedding.weight[self.task_id]
        inputs, targets = [], []
        for i, (t, s) in enumerate(zip(text_len.tolist(), speech_len.tolist())):
            inputs.append(torch.cat([sos[None], spk[i:i + 1], text[i, :t], task[None], speech[i, :s]]))
            targets.append(torch.cat([speech_token.new_full((2 + t,), IGNORE_ID), speech_token[i, :s],
                                      speech_token.new_full((1,), self.eos_token)]))
        lengths = torch.tensor([x.shape[0] for x in inputs], dtype=torch.int32, device=text.device)
        lm_input = nn.utils.rnn.pad_sequence(inputs, batch_first=True, padding_value=IGNORE_ID)
        lm_target = nn.utils.rnn.pad_sequence(targets, batch_first=True, padding_value=IGNORE_ID)
        return lm_target.long(), lm_input, lengths

    def forward(self, batch: dict, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Upstream's training step: ``{"loss", "acc"}`` over the batch's speech tokens and eos."""
        text_token, text_len = batch["text_token"].to(device), batch["text_token_len"].to(device)
        speech_token, speech_len = batch["speech_token"].to(device), batch["speech_token_len"].to(device)
        target, lm_input, lengths = self.prepare_lm_input_target(text_token, text_len, speech_token, speech_len,
                                                                 batch["embedding"].to(device))
        hidden, _ = self.llm(lm_input, lengths)
        keep = target != IGNORE_ID
        logits = self.llm_decoder(hidden[keep])
        target = target[keep]
        self.last_stats = {"tokens": int(lengths.sum()), "padded_tokens": lm_input.shape[0] * lm_input.shape[1],
                           "target_tokens": int(target.numel())}
        total = label_smoothing_loss(logits, target, self.lsm_weight)
        denom = target.numel() if self.length_normalized_loss else text_token.shape[0]
        acc = (logits.argmax(dim=-1) == target).float().mean().detach()
        return {"loss": total / max(denom, 1), "acc": acc}

    # -- generation --------------------------------------------------------------------------------
    def sampling_ids(self, weighted_scores: torch.Tensor, decoded_tokens: list[int], sampling,
                     ignore_eos: bool = True) -> int:
        if ignore_eos:
            weighted_scores = weighted_scores.clone()
            weighted_scores[self.eos_token] = -float("inf")
        return int(self.sampling(weighted_scores, decoded_tokens, sampling))

    @torch.inference_mode()
    def inference(self, text: torch.Tensor, text_len: torch.Tensor, prompt_text: torch.Tensor,
                  prompt_text_len: torch.Tensor, prompt_speech_token: torch.Tensor,
                  prompt_speech_token_len: torch.Tensor, embedding: torch.Tensor, sampling: int = 25,
                  max_token_text_ratio: float = 20, min_token_text_ratio: float = 2, uuid: str = "") -> Iterator[int]:
        """Speech token ids for ``text`` (1, T), continuing ``prompt_speech_token`` after ``prompt_text``;
        stops at eos, which is not allowed before ``min_token_text_ratio x T`` tokens; at most
        ``max_token_text_ratio x T`` tokens (T excludes the prompt text). ``embedding`` (1, 192), or
        (0, 192) for no speaker row. ``uuid`` is accepted for upstream's signature."""
        if self.sampling is None:
            raise ValueError("TransformerLM.inference needs a sampling function (the recipe's `sampling`)")
        n_text = int(text_len.reshape(-1)[0])
        n_prompt_text = int(prompt_text_len.reshape(-1)[0])
        n_prompt_speech = int(prompt_speech_token_len.reshape(-1)[0])
        text_all = torch.cat([prompt_text[:, :n_prompt_text], text[:, :n_text]], dim=1)
        encoded = self.encode(text_all, torch.tensor([text_all.shape[1]], device=text_all.device))
        parts = [self.llm_embedding.weight[self.sos][None]]
        if embedding.shape[0] != 0:
            parts.append(self.speaker(embedding[:1]))
        parts += [encoded[0], self.llm_embedding.weight[self.task_id][None]]
        if n_prompt_speech:
            prompt = self._valid_ids(prompt_speech_token[:1, :n_prompt_speech],
                                     torch.tensor([n_prompt_speech], device=text.device), self.speech_token_size,
                                     "prompt speech token")
            parts.append(self.speech_embedding(prompt[0]))
        lm_input = torch.cat(parts)[None]
        yield from self.decode(lm_input, sampling, int(n_text * min_token_text_ratio), int(n_text * max_token_text_ratio))

    def decode(self, lm_input: torch.Tensor, sampling, min_len: int, max_len: int) -> Iterator[int]:
        """One id per step from the LLM input rows ``lm_input`` (1, L, D), each step attending to the cache."""
        state = self.llm.decode_state()
        out: list[int] = []
        for i in range(max_len):
            hidden = self.llm.extend(lm_input, state)
            logp = self.llm_decoder(hidden[:, -1]).log_softmax(dim=-1)[0]
            token = self.sampling_ids(logp, out, sampling, ignore_eos=i < min_len)
            if token == self.eos_token:
                return
            yield token
            out.append(token)
            lm_input = self.speech_embedding.weight[token].reshape(1, 1, -1)
