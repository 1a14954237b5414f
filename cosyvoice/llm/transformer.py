"""CosyVoice1's encoder stacks: the Conformer text encoder and the causal Transformer LLM body.

These are the espnet/wenet stacks the v1 recipe (``cosyvoice.yaml``) builds as
``cosyvoice.transformer.encoder.ConformerEncoder`` / ``TransformerEncoder``, restricted to the
settings that recipe uses: a linear input layer (``linear``, or ``linear_legacy`` with a ReLU after
its dropout), espnet relative positions (``rel_pos_espnet`` / ``rel_selfattn``), pre-norm blocks, no
convolution module, no macaron feed-forward, static chunk masks. Any other value is refused by name
at construction, so a recipe never silently builds a different network.

The constructors take upstream's keywords with upstream's defaults (a recipe that leaves out
``input_layer`` gets upstream's ``conv2d`` and so an error here, not a different model), and the
parameter names are upstream's so ``llm.pt`` loads strictly. The positional-encoding table is not
a parameter or buffer, as upstream.

Training (:meth:`RelPositionEncoder.forward`) runs a padded batch with upstream's masks (key padding
and, with ``static_chunk_size`` C > 0, position i sees keys before ``(i // C + 1) * C``; C = 1 is
causal) and its dropout, drawn in upstream's order. Generation (:meth:`RelPositionEncoder.extend`)
is causal with a key/value cache: each new position attends to the cached keys, and the relative
position codes are projected once per distance and layer (upstream projects ``2 n + 1`` codes per
layer and step), so a step costs O(prefix x dim) instead of a re-run of the prefix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice.acoustic.encoder import ConformerBlock, FeedForward, RelPositionAttention, relative_positions

INPUT_LAYERS = ("linear", "linear_legacy")


class LinearInput(nn.Module):
    """Upstream's ``LinearNoSubsampling`` (``linear``) / ``LegacyLinearNoSubsampling`` (``linear_legacy``)
    followed by the espnet positional scaling: Linear, LayerNorm, dropout [, ReLU], times sqrt(dim)."""

    def __init__(self, dim_in: int, dim: int, dropout: float, legacy: bool):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(dim_in, dim), nn.LayerNorm(dim, eps=1e-5), nn.Dropout(dropout)]
        if legacy:
            layers.append(nn.ReLU())
        self.out = nn.Sequential(*layers)
        self.scale = math.sqrt(dim)

    def forward(self, x: torch.Tensor, positional_dropout: float = 0.0) -> torch.Tensor:
        return F.dropout(self.out(x) * self.scale, positional_dropout, self.training)

    def without_dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Generation: the same layers with no dropout, whatever the module's mode."""
        for layer in self.out:
            if not isinstance(layer, nn.Dropout):
                x = layer(x)
        return x * self.scale


class ReluFeedForward(FeedForward):
    """The position-wise feed-forward of upstream's ``TransformerEncoderLayer`` (``activation_type: relu``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.relu(self.w_1(x)))

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.dropout(F.relu(self.w_1(x)), self.dropout, self.training))


class TransformerBlock(nn.Module):
    """Upstream's pre-norm ``TransformerEncoderLayer`` with relative-position attention (``norm1`` before
    attention, ``norm2`` before the ReLU feed-forward, dropout on each sub-layer's output)."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float = 0.0, attention_dropout: float = 0.0):
        super().__init__()
        self.self_attn = RelPositionAttention(heads, dim, attention_dropout)
        self.feed_forward = ReluFeedForward(dim, hidden, dropout)
        self.norm1 = nn.LayerNorm(dim, eps=1e-12)
        self.norm2 = nn.LayerNorm(dim, eps=1e-12)
        self.dropout = dropout

    def padded(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + F.dropout(self.self_attn.padded(self.norm1(x), pos, mask), self.dropout, self.training)
        return x + F.dropout(self.feed_forward.padded(self.norm2(x)), self.dropout, self.training)


def _sublayer_norms(block: nn.Module) -> tuple[nn.LayerNorm, nn.LayerNorm]:
    """(norm before attention, norm before the feed-forward) of either block kind."""
    if isinstance(block, ConformerBlock):
        return block.norm_mha, block.norm_ff
    return block.norm1, block.norm2


def padding_and_chunk_mask(lengths: torch.Tensor, size: int, chunk: int) -> torch.Tensor:
    """Boolean attention mask (B, 1 or T, T): keys inside each utterance, and with ``chunk`` C > 0 only
    keys before the end of the query's chunk. A query row with no visible key sees every key (as
    upstream, whose softmax would otherwise be NaN; such rows are padding)."""
    keys = torch.arange(size, device=lengths.device)
    mask = (keys[None, :] < lengths[:, None])[:, None, :]  # (B, 1, T)
    if chunk > 0:
        limit = (torch.div(keys, chunk, rounding_mode="floor") + 1) * chunk
        mask = mask & (keys[None, :] < limit[:, None])[None]  # (B, T, T)
    empty = ~mask.any(dim=-1, keepdim=True)
    if bool(empty.any()):
        mask = mask | empty
    return mask


class DecodeState:
    """What generation keeps between calls of :meth:`RelPositionEncoder.extend` for one sequence:
    per layer the keys and values of every position so far and the relative position codes projected
    by that layer's ``linear_pos`` (row r = distance r). Buffers grow by doubling, so appending one
    position is amortised O(1)."""

    def __init__(self, layers: int):
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.positions: list[torch.Tensor | None] = [None] * layers  # (H, R, d) per layer

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` (1, H, t, d) after the cached positions; return all keys and values so far."""
        end = self.length + k.shape[2]
        cached = self.keys[layer]
        if cached is None or cached.shape[2] < end:
            capacity = max(end, 2 * (cached.shape[2] if cached is not None else 0), 64)
            grown_k = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
            grown_v = torch.empty_like(grown_k)
            if cached is not None:
                grown_k[:, :, :self.length] = cached[:, :, :self.length]
                grown_v[:, :, :self.length] = self.values[layer][:, :, :self.length]
            self.keys[layer], self.values[layer] = grown_k, grown_v
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def projected_positions(self, layer: int, attn: RelPositionAttention, size: int, like: torch.Tensor) -> torch.Tensor:
        """``attn.linear_pos`` of the codes of distances ``0 .. size-1``, (H, size, d)."""
        have = self.positions[layer]
        n = have.shape[1] if have is not None else 0
        if n < size:
            new = max(size, 2 * n, 64)
            codes = relative_positions(n, new - 1, attn.heads * attn.head_dim, like.device, like.dtype).flip(0)
            p = attn.linear_pos(codes).view(-1, attn.heads, attn.head_dim).transpose(0, 1)
            self.positions[layer] = p if have is None else torch.cat([have, p], dim=1)
        return self.positions[layer][:, :size]


def cached_attention(attn: RelPositionAttention, x: torch.Tensor, state: DecodeState, layer: int) -> torch.Tensor:
    """Causal relative-position attention of the new positions ``x`` (1, t, D) over the cached ones and
    themselves; the same function as :meth:`RelPositionAttention.padded` under a causal mask."""
    b, t, _ = x.shape
    h, d = attn.heads, attn.head_dim
    start = state.length
    end = start + t
    q = attn.linear_q(x).view(b, t, h, d)
    k, v = state.append(layer, attn.linear_k(x).view(b, t, h, d).transpose(1, 2),
                        attn.linear_v(x).view(b, t, h, d).transpose(1, 2))
    content = torch.matmul((q + attn.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))  # (B, H, t, end)
    p = state.projected_positions(layer, attn, end, x)  # (H, end, d): distance r in row r
    by_distance = torch.matmul((q + attn.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))  # (B, H, t, end)
    # query start + a and key j are (start + a - j) apart; future keys (negative distance) are masked
    distance = (start + torch.arange(t, device=x.device)[:, None]) - torch.arange(end, device=x.device)[None, :]
    position = torch.gather(by_distance, 3, distance.clamp(min=0).expand(b, h, t, end))
    scores = (content + position) / math.sqrt(d)
    if t > 1:
        scores = scores.masked_fill(distance < 0, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(b, t, h * d)
    return attn.linear_out(out)


def check_supported(owner: str, settings: list[tuple[str, object, tuple]]) -> None:
    """Refuse, all at once and by name, every setting whose value is not among the supported ones."""
    wrong = [f"{name}={value!r} (supported: {', '.join(map(repr, supported))})"
             for name, value, supported in settings if value not in supported]
    if wrong:
        raise ValueError(f"{owner}: not supported by cosyvoice-pipeline: {'; '.join(wrong)}. The CosyVoice1 recipe "
                         f"(examples/libritts/cosyvoice/conf/cosyvoice.yaml) sets the supported values explicitly")


class RelPositionEncoder(nn.Module):
    """Input layer, pre-norm blocks with espnet relative positions, final LayerNorm (upstream's ``BaseEncoder``)."""

    def __init__(self, owner: str, input_size: int, output_size: int, attention_heads: int, dropout_rate: float,
                 positional_dropout_rate: float, input_layer: str, pos_enc_layer_type: str,
                 selfattention_layer_type: str, normalize_before: bool, static_chunk_size: int,
                 use_dynamic_chunk: bool, use_dynamic_left_chunk: bool, global_cmvn, key_bias: bool,
                 gradient_checkpointing: bool, block_settings: list[tuple[str, object, tuple]]):
        super().__init__()
        check_supported(owner, [
            ("input_layer", input_layer, INPUT_LAYERS), ("pos_enc_layer_type", pos_enc_layer_type, ("rel_pos_espnet",)),
            ("selfattention_layer_type", selfattention_layer_type, ("rel_selfattn",)),
            ("normalize_before", normalize_before, (True,)), ("use_dynamic_chunk", use_dynamic_chunk, (False,)),
            ("use_dynamic_left_chunk", use_dynamic_left_chunk, (False,)), ("global_cmvn", global_cmvn, (None,)),
            ("key_bias", key_bias, (True,)), ("gradient_checkpointing", gradient_checkpointing, (False,)),
            *block_settings])
        if not isinstance(static_chunk_size, int) or static_chunk_size < 0:
            raise ValueError(f"{owner}: static_chunk_size must be an integer >= 0 (0: full attention, 1: causal), "
                             f"got {static_chunk_size!r}")
        if output_size % attention_heads:
            raise ValueError(f"{owner}: output_size {output_size} is not a multiple of attention_heads {attention_heads}")
        self._output_size = output_size
        self.static_chunk_size = static_chunk_size
        self.dropout_rate = dropout_rate
        self.positional_dropout_rate = positional_dropout_rate
        # registration order = upstream's state-dict order: embed, after_norm, encoders
        self.embed = LinearInput(input_size, output_size, dropout_rate, legacy=input_layer == "linear_legacy")
        self.after_norm = nn.LayerNorm(output_size, eps=1e-5)

    def output_size(self) -> int:
        return self._output_size

    def forward(self, xs: torch.Tensor, xs_lens: torch.Tensor, decoding_chunk_size: int = 0,
                num_decoding_left_chunks: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded batch ``xs`` (B, T, input_size) -> (B, T, output_size) and the padding mask (B, 1, T).

        ``decoding_chunk_size`` / ``num_decoding_left_chunks`` are accepted for upstream's call
        signature; with static chunks (the only mode supported) upstream ignores them too.
        """
        t = xs.shape[1]
        mask = padding_and_chunk_mask(xs_lens, t, self.static_chunk_size)
        x = self.embed(xs, self.positional_dropout_rate)
        pos = relative_positions(-(t - 1), t - 1, self._output_size, x.device, x.dtype)
        pos = F.dropout(pos, self.positional_dropout_rate, self.training)
        attention_mask = mask[:, None]
        for block in self.encoders:
            x = block.padded(x, pos, attention_mask)
        pad = torch.arange(t, device=xs.device)[None, None, :] < xs_lens[:, None, None]
        return self.after_norm(x), pad

    def decode_state(self) -> DecodeState:
        return DecodeState(len(self.encoders))

    def extend(self, xs: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Causal generation: outputs (1, t, D) of the ``t`` positions ``xs`` (1, t, input_size) that follow
        the ``state.length`` positions already seen; extends ``state``. The same values as
        :meth:`forward` with ``static_chunk_size`` 1 over the whole sequence (eval mode)."""
        if xs.shape[0] != 1:
            raise ValueError(f"extend decodes one sequence at a time, got a batch of {xs.shape[0]}")
        x = self.embed.without_dropout(xs)
        for layer, block in enumerate(self.encoders):
            norm_attention, norm_ff = _sublayer_norms(block)
            x = x + cached_attention(block.self_attn, norm_attention(x), state, layer)
            x = x + block.feed_forward(norm_ff(x))
        state.length += xs.shape[1]
        return self.after_norm(x)


class ConformerEncoder(RelPositionEncoder):
    """CosyVoice1's text encoder: Conformer blocks (swish feed-forward) without convolution or macaron parts."""

    def __init__(self, input_size: int, output_size: int = 256, attention_heads: int = 4, linear_units: int = 2048,
                 num_blocks: int = 6, dropout_rate: float = 0.1, positional_dropout_rate: float = 0.1,
                 attention_dropout_rate: float = 0.0, input_layer: str = "conv2d", pos_enc_layer_type: str = "rel_pos",
                 normalize_before: bool = True, static_chunk_size: int = 0, use_dynamic_chunk: bool = False,
                 global_cmvn=None, use_dynamic_left_chunk: bool = False, positionwise_conv_kernel_size: int = 1,
                 macaron_style: bool = True, selfattention_layer_type: str = "rel_selfattn",
                 activation_type: str = "swish", use_cnn_module: bool = True, cnn_module_kernel: int = 15,
                 causal: bool = False, cnn_module_norm: str = "batch_norm", key_bias: bool = True,
                 gradient_checkpointing: bool = False):
        # positionwise_conv_kernel_size is unused upstream too; the cnn_module_* / causal settings
        # only shape the convolution module, which is refused below
        super().__init__("ConformerEncoder", input_size, output_size, attention_heads, dropout_rate,
                         positional_dropout_rate, input_layer, pos_enc_layer_type, selfattention_layer_type,
                         normalize_before, static_chunk_size, use_dynamic_chunk, use_dynamic_left_chunk, global_cmvn,
                         key_bias, gradient_checkpointing,
                         [("macaron_style", macaron_style, (False,)), ("use_cnn_module", use_cnn_module, (False,)),
                          ("activation_type", activation_type, ("swish",))])
        self.encoders = nn.ModuleList(
            ConformerBlock(output_size, attention_heads, linear_units, dropout_rate, attention_dropout_rate)
            for _ in range(num_blocks))


class TransformerEncoder(RelPositionEncoder):
    """CosyVoice1's LLM body: pre-norm Transformer blocks (ReLU feed-forward), causal with ``static_chunk_size: 1``."""

    def __init__(self, input_size: int, output_size: int = 256, attention_heads: int = 4, linear_units: int = 2048,
                 num_blocks: int = 6, dropout_rate: float = 0.1, positional_dropout_rate: float = 0.1,
                 attention_dropout_rate: float = 0.0, input_layer: str = "conv2d", pos_enc_layer_type: str = "abs_pos",
                 normalize_before: bool = True, static_chunk_size: int = 0, use_dynamic_chunk: bool = False,
                 global_cmvn=None, use_dynamic_left_chunk: bool = False, key_bias: bool = True,
                 selfattention_layer_type: str = "selfattn", activation_type: str = "relu",
                 gradient_checkpointing: bool = False):
        super().__init__("TransformerEncoder", input_size, output_size, attention_heads, dropout_rate,
                         positional_dropout_rate, input_layer, pos_enc_layer_type, selfattention_layer_type,
                         normalize_before, static_chunk_size, use_dynamic_chunk, use_dynamic_left_chunk, global_cmvn,
                         key_bias, gradient_checkpointing, [("activation_type", activation_type, ("relu",))])
        self.encoders = nn.ModuleList(
            TransformerBlock(output_size, attention_heads, linear_units, dropout_rate, attention_dropout_rate)
            for _ in range(num_blocks))
