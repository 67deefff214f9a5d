"""KV-cache generation: one prefill over the (left-padded) prompts, then one token per step.

The cache is preallocated for prompt + max_new_tokens, so no step recomputes or reallocates the prefix.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from .model import Qwen

# allowed_tokens(step, generated) -> bool (batch, vocab) of tokens permitted next, or None for "anything".
# `generated` holds the `step` tokens produced so far (batch, step).
AllowedTokens = Callable[[int, torch.Tensor], "torch.Tensor | None"]


class NonFiniteLogits(FloatingPointError):
    """The model produced NaN or infinite logits: generation stops rather than sample from them."""


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of `logits` (batch, vocab): argmax when temperature is 0, else a seeded draw."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the best one always stays.
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: Qwen, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, stop_token_ids: Iterable[int] = (),
             allowed_tokens: AllowedTokens | None = None, pad_token_id: int | None = None,
             candidate_ids: torch.Tensor | list[int] | None = None, num_samples: int = 1) -> torch.Tensor:
    """New tokens (batch * num_samples, n <= max_new_tokens). A row that produced a stop token is filled with
    `pad_token_id` afterwards (default: the first stop token, else 0); generation ends when every row has stopped.

    candidate_ids: every token that may ever be produced (e.g. all a grammar allows, stop tokens included). The LM
    head is then computed for these rows only; greedy output is identical, sampling draws from the identical
    distribution, and a decode step of a 0.5B model skips a 151,936 x 896 matmul.

    num_samples: rows per prompt (row b * num_samples + k is prompt b's k-th sample). Each prompt is prefilled once
    and its cache copied to its samples' rows, so K samples cost one prefill, not K."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, prompt_len>0), got shape {tuple(input_ids.shape)}")
    stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=input_ids.device)
    if pad_token_id is None:
        pad_token_id = int(stop_ids[0]) if len(stop_ids) else 0
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    B, P = input_ids.shape
    head = model.lm_head.weight
    if candidate_ids is not None:
        candidate_ids = torch.as_tensor(candidate_ids, dtype=torch.long, device=input_ids.device).unique()
        missing = stop_ids[~torch.isin(stop_ids, candidate_ids)]
        if len(missing):
            raise ValueError(f"stop token(s) {missing.tolist()} are not among candidate_ids")
        head = head[candidate_ids]
    # With several samples the prompts' cache needs no room to grow: only its copies, one per sample, do.
    cache = model.new_cache(B, P + max_new_tokens if num_samples == 1 else P)
    logits = prefill(model, input_ids, attention_mask, cache, head)
    if num_samples > 1:
        cache = cache.repeat_interleave(num_samples, max_len=P + max_new_tokens)
        logits, B = logits.repeat_interleave(num_samples, dim=0), B * num_samples
    out = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    ones = torch.ones(B, 1, dtype=torch.long, device=input_ids.device)
    for step in range(max_new_tokens):
        if not bool(torch.isfinite(logits).all()):  # one reduction a step, beside the step's own work
            raise NonFiniteLogits(f"non-finite logits at generated token {step}: the model's weights or activations "
                                  "hold NaN or infinity, so whatever it wrote would be meaningless")
        if allowed_tokens is not None:
            allowed = allowed_tokens(step, out[:, :step])
            if allowed is not None:
                allowed = allowed.to(logits.device)
                if candidate_ids is not None:
                    allowed = allowed[:, candidate_ids]
                logits = logits.masked_fill(~allowed, float("-inf"))
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if candidate_ids is not None:
            token = candidate_ids[token]
        token = token.masked_fill(finished, pad_token_id)
        out[:, step] = token
        finished |= torch.isin(token, stop_ids)
        if bool(finished.all()) or step == max_new_tokens - 1:
            return out[:, :step + 1]
        logits = decode_one(model, token[:, None], ones, cache, head)
    return out


def prefill(model: Qwen, input_ids, attention_mask, cache, head: torch.Tensor) -> torch.Tensor:
    """Fill the cache with the prompts; logits of the last position only (the full-vocab logits of every prompt
    position would cost more memory than the cache). `head`: the LM head's weight rows to score."""
    hidden = model.hidden_states(input_ids, attention_mask, kv_cache=cache)
    return (hidden[:, -1] @ head.T).float()


def decode_one(model: Qwen, token, attention_mask, cache, head: torch.Tensor) -> torch.Tensor:
    return (model.hidden_states(token, attention_mask, kv_cache=cache)[:, -1] @ head.T).float()
