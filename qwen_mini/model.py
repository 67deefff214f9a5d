"""Qwen2 / Qwen2.5 decoder in plain PyTorch.

Module and parameter names follow Hugging Face's `Qwen2ForCausalLM` (model.layers.N.self_attn.q_proj, ...), so an
official checkpoint's state dict loads into this model without renaming. LoRA wraps these linears and the FLOP
counter reads their shapes: this file is the one description of the architecture.

Sequences may be left padded: `attention_mask` marks real tokens, and rotary positions count real tokens only
(`positions_and_mask`, one rule with a KV cache and without). `meta_model` builds the model on the meta device, all
shapes and no weights, for the FLOP counter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

from .config import QwenConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32, cast back before the weight multiply: exactly the reference's rounding.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the "rotate_half" layout: dimension i pairs with i + head_dim/2.

    The frequencies are kept in float32 on purpose (not a buffer, so `model.to(bfloat16)` cannot round them):
    positions in the thousands would otherwise land on visibly wrong angles."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        self.inv_freq = 1.0 / theta ** exponents
        self._inv_freq_on = {}  # device -> copy, so decoding does not copy it every step

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        device = position_ids.device
        if device not in self._inv_freq_on:
            self._inv_freq_on[device] = self.inv_freq.to(device)
        freqs = position_ids.float()[..., None] * self._inv_freq_on[device]  # (B, T, head_dim/2)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, head_dim); cos/sin: (B, T, head_dim)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class Linear(nn.Linear):
    """nn.Linear whose float32 inference on CPU runs oneDNN's GEMM: at decode-sized inputs (tens of rows) on 2 cores
    it is 2-4x faster than the default MKL GEMM, which hardly uses the second core there; at training sizes the two
    are within noise. Results agree to float32 rounding (~1e-6 relative). Not under autograd or autocast, not while
    compiling (inductor picks its own GEMM), not under a dispatch mode (FLOP counters see a plain linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ONEDNN_LINEAR and x.dtype == torch.float32 and not torch.is_grad_enabled() and x.device.type == "cpu" \
                and self.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu") \
                and not torch.compiler.is_compiling() and _current_dispatch_mode() is None:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


ONEDNN_LINEAR = torch.backends.mkldnn.is_available()


class Attention(nn.Module):
    def __init__(self, config: QwenConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                        config.head_dim)
        self.q_proj = Linear(config.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.v_proj = Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.o_proj = Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, kv_cache=None):
        B, T = cos.shape[:2]  # x is (B, T, hidden), or the real tokens of a padded decode chunk (see KVCache.packed)
        packed = kv_cache.packed if kv_cache is not None else None
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if packed is not None:
            q, k, v = (unpack_tokens(t, packed, B, T) for t in (q, k, v))
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        prefix = kv_cache.prefix if kv_cache is not None else None
        if prefix is not None:  # samples of shared prompts: each prompt's keys/values once, each sample's own suffix
            y = shared_prefix_attention(q, k, v, mask, prefix.k[self.layer_idx], prefix.v[self.layer_idx],
                                        prefix.mask)
        elif mask is not None and T * self.n_heads // self.n_kv_heads <= PACKED_QUERIES:
            y = packed_query_attention(q, k, v, mask)  # decode steps: few queries per key/value head
        else:  # mask None means "plain causal, no padding": the fast fused path used in training.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.n_heads != self.n_kv_heads)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y if packed is None else y.flatten(0, 1)[packed])


def unpack_tokens(x: torch.Tensor, index: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """(N, features) rows of the real tokens -> (B, T, features), zeros where `index` (into B * T) has none."""
    grid = x.new_zeros(B * T, x.shape[-1])
    grid[index] = x
    return grid.view(B, T, -1)


# Decode steps attend with at most this many queries per key/value head (query heads sharing it x tokens per row).
PACKED_QUERIES = 64
# Calls of at most this many tokens per row through an eager cache are decode chunks: their padding is not computed.
PACK_TOKENS = 4


def packed_query_attention(q, k, v, mask):
    """Attention of few queries (decode steps) with the query heads that share a key/value head stacked as one longer
    query sequence: (B, kv_heads, group * T, head_dim) against (B, kv_heads, S, head_dim). The same arithmetic as
    grouped SDPA, but CPU kernels handle a handful of queries per head slowly (bf16 10-15x, fp32 1.5x measured on 2
    cores); HF's SDPA attention packs the same way for single-token decode where it cannot use enable_gqa.
    q: (B, heads, T, head_dim); k, v: (B, kv_heads, S, head_dim); mask: (B, 1, T, S) bool."""
    B, H, T, D = q.shape
    kv_heads, S = k.shape[1], k.shape[2]
    group = H // kv_heads
    packed_mask = mask[:, :, None].expand(B, 1, group, T, S).reshape(B, 1, group * T, S)
    y = F.scaled_dot_product_attention(q.reshape(B, kv_heads, group * T, D), k, v, attn_mask=packed_mask)
    return y.reshape(B, H, T, D)  # not view: SDPA's output is not contiguous on CUDA


def shared_prefix_attention(q, k, v, mask, prefix_k, prefix_v, prefix_mask):
    """Attention of the samples of shared prompts (cascade attention: Hydragen, FlashInfer's cascade inference):
    row r = b * samples + s attends to prompt b's keys/values, stored once, and to its own suffix. Each part is a
    partial attention with its log-sum-exp, merged exactly (`merge_attention`): the softmax over the concatenation.
    The prompt's part stacks all samples' queries of one key/value head as one query sequence, so a step reads each
    prompt's keys once for all its samples, in one larger matrix product.
    q: (rows, heads, T, head_dim); k, v: (rows, kv_heads, S, head_dim), mask: (rows, 1, T, S) bool (the suffix);
    prefix_k, prefix_v: (prompts, kv_heads, P, head_dim), prefix_mask: (prompts, P) bool (its real tokens)."""
    R, H, T, D = q.shape
    prompts, kv_heads = prefix_k.shape[:2]
    group, samples = H // kv_heads, R // prompts
    # (prompts, samples, kv_heads, group * T, D) -> (prompts, kv_heads, samples * group * T, D)
    stacked = q.reshape(prompts, samples, kv_heads, group * T, D).transpose(1, 2).reshape(prompts, kv_heads, -1, D)
    prompt_out, prompt_lse = partial_attention(stacked, prefix_k, prefix_v, prefix_mask[:, None, None, :])
    prompt_out = prompt_out.reshape(prompts, kv_heads, samples, group * T, D).transpose(1, 2).reshape(R, H, T, D)
    prompt_lse = prompt_lse.reshape(prompts, kv_heads, samples, group * T, 1).transpose(1, 2).reshape(R, H, T, 1)
    grouped_mask = mask[:, :, None].expand(R, 1, group, T, mask.shape[-1]).reshape(R, 1, group * T, -1)
    own_out, own_lse = partial_attention(q.reshape(R, kv_heads, group * T, D), k, v, grouped_mask)
    out = merge_attention(prompt_out, prompt_lse, own_out.reshape(R, H, T, D), own_lse.reshape(R, H, T, 1))
    return out.to(q.dtype)


def partial_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d), masked) v over these keys only, and the log-sum-exp of its scores, both float32: what
    `merge_attention` needs to combine it with attention over other keys. A query that sees no key here gets weight 0
    in the merge (its log-sum-exp is about the float32 minimum), not NaN. q: (..., N, d); k, v: (..., S, d); mask
    (bool) broadcasts to (..., N, S). Eager on CPU it is one fused kernel (the flash kernel SDPA runs, which also
    returns the log-sum-exp): at decode sizes the step is a chain of small ops, each paying its dispatch."""
    if q.device.type == "cpu" and q.dim() == 4 and not torch.compiler.is_compiling() \
            and _current_dispatch_mode() is None:
        # Every key visible (decode steps in lockstep, no padding): no bias, which the kernel would read as much as k.
        bias = None if bool(mask.all()) else \
            torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, torch.finfo(q.dtype).min)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias)
        return out.float(), lse.float()[..., None]
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    top = scores.amax(-1, keepdim=True)
    weights = (scores - top).exp()
    total = weights.sum(-1, keepdim=True)
    out = (weights.to(v.dtype) @ v).float() / total
    return out, top + total.log()


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Two partial attentions of the same queries over disjoint sets of keys -> the attention over their union, exactly
    the softmax over the concatenated scores (FlashInfer's merge_state). out: (..., d); lse: (..., 1)."""
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a * (lse_a - lse).exp() + out_b * (lse_b - lse).exp()


class MLP(nn.Module):
    def __init__(self, config: QwenConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: QwenConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Preallocated keys/values for every layer. Each row of the batch fills its own slots from the left: a forward
    call of T tokens per row writes row b's tokens at slots lengths[b] .. lengths[b] + T - 1, so rows may advance by
    different numbers of tokens (a decode chunk whose shorter rows end in padding: jump-forward decoding).

    `slot_mask` marks the slots that hold real tokens (not the left padding of a prompt, not the trailing padding of
    a chunk, whose slots the row's next tokens overwrite); `lengths` counts each row's slots up to its last real
    token, `positions` its real tokens (the rotary position of its next one). A static cache attends over all
    `max_len` slots, so a decode step's shapes never change and its state lives in tensors only: what a compiled
    step (and a CUDA graph) needs. Otherwise attention covers the slots used so far.
    """

    def __init__(self, config: QwenConfig, batch_size: int, max_len: int, dtype=torch.float32, device=None,
                 static: bool = False):
        # One tensor per layer: a compiled step then writes each in place (slices of one big tensor would be
        # rebuilt whole on every write).
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.slot_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len, self.static = max_len, static
        self.used = 0  # the most slots any row used (eager caches only: a static one keeps no Python state)
        self._slots = None  # (B, T) slots of the call in progress, between `begin` and `end`
        # Between `begin` and `end` of a decode chunk with padding (rows that jumped ahead by fewer tokens, or stopped):
        # the flat indices (into B * T) of its real tokens. The layers then compute those only, (N, hidden), and
        # attention puts them back in the (B, T) grid; eager caches only (a static one keeps its shapes).
        self.packed = None
        self.prefix: SharedPrefix | None = None  # keys/values every row's attention also reads (see `share`)

    @property
    def length(self) -> int:
        """Slots used by the longest row."""
        return int(self.lengths.max()) if len(self.lengths) else 0

    def begin(self, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Claim slots for a call of T tokens per row (`attention_mask` (B, T) marks the real ones) before the layers
        write them. Returns the rotary position of each token and the (B, 1, T, S) boolean attention mask: a token
        sees the real tokens of its row up to its own slot, and its own slot (padding never softmaxes over nothing)."""
        B, T = attention_mask.shape
        if not self.static and self.used + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.used} used + {T} new do not fit")
        real = attention_mask.bool()
        slots = self.lengths[:, None] + torch.arange(T, device=real.device)
        self.slot_mask[torch.arange(B, device=real.device)[:, None], slots] = real
        key_slots = torch.arange(self.slot_mask.shape[1] if self.static else self.used + T, device=real.device)
        position_ids, mask = positions_and_mask(real, slots, key_slots, self.slot_mask[:, :len(key_slots)],
                                                start=self.positions[:, None])
        self._slots = slots
        if not self.static and T <= PACK_TOKENS and not bool(real.all()):
            self.packed = real.flatten().nonzero().squeeze(1)
        return position_ids, mask

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Write one layer's keys/values (B, heads, T, head_dim) at the claimed slots; all keys/values to attend to."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        keys, values = self.k[layer_idx], self.v[layer_idx]
        keys[rows, :, self._slots] = k.transpose(1, 2).to(keys.dtype)
        values[rows, :, self._slots] = v.transpose(1, 2).to(values.dtype)
        if self.static:
            return keys, values
        end = self.used + k.shape[2]
        return keys[:, :, :end], values[:, :, :end]

    def end(self, attention_mask: torch.Tensor) -> None:
        """After the layers: each row has used the slots up to its last real token of the call."""
        real = attention_mask.bool()
        T = real.shape[1]
        last = T - real.flip(-1).long().argmax(-1)  # one past the last real token; T when none is real: fixed below
        self.lengths += torch.where(real.any(-1), last, 0)
        self.positions += real.sum(-1)
        self._slots = self.packed = None
        if not self.static:
            self.used = self.length

    def repeat_interleave(self, repeats: int, max_len: int | None = None, static: bool | None = None) -> KVCache:
        """A new cache (room for `max_len` positions, default the same) whose row b * repeats + r holds a copy of
        this cache's row b: the prompt's cache for each of its samples."""
        max_len = self.max_len if max_len is None else max_len
        used = self.length
        if max_len < used:
            raise ValueError(f"a cache holding {used} positions cannot be copied into {max_len}")
        if self.prefix is not None:
            raise ValueError("a cache whose rows share a prefix cannot be copied row by row")
        B, H, _, D = self.k[0].shape
        copy = object.__new__(KVCache)
        filled = slice(0, used)

        def copied(layer: torch.Tensor) -> torch.Tensor:
            rows = layer.new_zeros(B * repeats, H, max_len, D)
            rows[:, :, filled] = layer[:, :, filled].repeat_interleave(repeats, dim=0)
            return rows

        copy.k, copy.v = [copied(layer) for layer in self.k], [copied(layer) for layer in self.v]
        copy.slot_mask = self.slot_mask.new_zeros(B * repeats, max_len)
        copy.slot_mask[:, filled] = self.slot_mask[:, filled].repeat_interleave(repeats, dim=0)
        copy.lengths = self.lengths.repeat_interleave(repeats)
        copy.positions = self.positions.repeat_interleave(repeats)
        copy.max_len, copy.static = max_len, self.static if static is None else static
        copy.used, copy._slots, copy.packed, copy.prefix = used, None, None, None
        return copy

    def share(self, samples: int, suffix_len: int, static: bool = False) -> KVCache:
        """A cache for `samples` rows per row of this one (the prompts'), row b * samples + s for prompt b's sample
        s, that holds the prompts' keys/values once (`prefix`: this cache's filled slots, not copied) and gives each
        row room for `suffix_len` tokens of its own: KV memory of one prompt + `samples` suffixes, where
        `repeat_interleave` copies the prompt to every row. Attention reads the prompt once per step for all its
        samples (`shared_prefix_attention`); the tokens and logits are those of the copies'."""
        if self.prefix is not None:
            raise ValueError("a cache whose rows already share a prefix cannot be shared again")
        rows = self.lengths.shape[0] * samples
        p = self.k[0]
        shape = (rows, p.shape[1], suffix_len, p.shape[3])
        suffix = KVCache.__new__(KVCache)
        suffix.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in self.k]
        suffix.v = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in self.v]
        suffix.slot_mask = torch.zeros(rows, suffix_len, dtype=torch.bool, device=p.device)
        suffix.lengths = torch.zeros(rows, dtype=torch.long, device=p.device)
        suffix.positions = self.positions.repeat_interleave(samples)  # rotary positions go on after the prompt
        suffix.max_len, suffix.static, suffix.used, suffix._slots, suffix.packed = suffix_len, static, 0, None, None
        used = self.length
        suffix.prefix = SharedPrefix([layer[:, :, :used] for layer in self.k], [layer[:, :, :used] for layer in self.v],
                                     self.slot_mask[:, :used])
        return suffix


@dataclass(frozen=True)
class SharedPrefix:
    """Keys/values of prompts shared by their samples' rows (`KVCache.share`): per layer (prompts, kv_heads, P,
    head_dim), and `mask` (prompts, P) marking each prompt's real tokens (not its left padding)."""
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    mask: torch.Tensor


class Qwen(nn.Module):
    def __init__(self, config: QwenConfig):
        super().__init__()
        self.config = config
        self.model = nn.Module()  # HF nests the decoder under `model.` — keep the names identical
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.model.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(init_weights)

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache: KVCache | None = None):
        """Logits (batch, seq, vocab)."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, kv_cache))

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, kv_cache: KVCache | None = None):
        """Final-norm hidden states (batch, seq, hidden): callers that need only some positions' logits (generation,
        chunked loss) apply `lm_head` themselves."""
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        if kv_cache is not None:
            if attention_mask is None:
                attention_mask = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
            cache_positions, mask = kv_cache.begin(attention_mask)
            position_ids = cache_positions if position_ids is None else position_ids
        elif attention_mask is None:
            mask = None  # causal, no padding: the fast fused path used in training
            if position_ids is None:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        else:  # padding, no cache: token t sits in slot t
            real = attention_mask.bool()
            slots = torch.arange(T, device=real.device)
            real_positions, mask = positions_and_mask(real, slots, slots, real)
            position_ids = real_positions if position_ids is None else position_ids
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)
        packed = kv_cache.packed if kv_cache is not None else None
        if packed is not None:  # a padded decode chunk: the layers compute its real tokens only
            x = x.flatten(0, 1)[packed]
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.end(attention_mask)
        x = self.model.norm(x)
        return x if packed is None else unpack_tokens(x, packed, B, T)

    def new_cache(self, batch_size: int, max_len: int, static: bool = False) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, dtype=p.dtype, device=p.device, static=static)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """HF's Qwen2 initialisation (normal(0, 0.02), zero biases, unit norms): random models start with sane logits."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def positions_and_mask(real: torch.Tensor, slots: torch.Tensor, key_slots: torch.Tensor, key_real: torch.Tensor,
                       start: torch.Tensor | int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule of every attention call, with a cache or without: a token's rotary position counts the real tokens of
    its row before it (plus `start`, those already cached); the token in slot `slots[b, t]` sees the real keys of its
    row (`key_real` (B, S) over `key_slots` (S,)) up to its own slot, and its own slot, so a padding token never
    softmaxes over nothing (its output is ignored). `real` (B, T): the call's real tokens. Returns the position ids
    (B, T) and the boolean mask (B, 1, T, S)."""
    position_ids = (start + real.long().cumsum(-1) - 1).clamp(min=0)
    seen = (key_slots <= slots[..., None]) & key_real[:, None, :]
    return position_ids, (seen | (key_slots == slots[..., None]))[:, None]


class _SkipRandomInitOnMeta(TorchFunctionMode):
    """Makes random initialisation of meta tensors a no-op (a meta tensor holds no values to initialise).

    Needed for speed only: torch routes `normal_` on meta tensors through a Python reference implementation whose
    first call imports torch._dynamo, about a second — longer than building the model."""
    _RANDOM_INITS = {nn.init.normal_, nn.init.uniform_, nn.init.trunc_normal_, nn.init.kaiming_uniform_,
                     nn.init.kaiming_normal_, torch.Tensor.normal_, torch.Tensor.uniform_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._RANDOM_INITS:
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def meta_model(config: QwenConfig) -> Qwen:
    """The model of `config` on the meta device: every shape, no weights allocated (the 0.5B model in ~50 ms), what
    the FLOP counter reads."""
    with torch.device("meta"), _SkipRandomInitOnMeta():
        return Qwen(config)
