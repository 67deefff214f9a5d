"""KV-cache generation: one prefill over the (left-padded) prompts, then decode steps until every row has stopped.

The cache is preallocated for prompt + max_new_tokens, so no step recomputes or reallocates the prefix. Each row
keeps its own length in the cache, so rows may advance by different numbers of tokens in one step:

- **Jump-forward** (`jump_forward=True`): where the constraint allows a row exactly one next token (the number
  grammar's separator after the last decimal, the point after a leading zero, the stop token after the horizon),
  that token is appended without sampling and fed together with the row's sampled token in the next step, so a
  forecast takes fewer forward passes (27 % fewer for LLMTIME numbers). Rows with fewer tokens in a step are padded;
  through an eager cache the layers compute the real tokens only. The tokens are those of plain decoding (see
  "Sampling"; in bf16, up to the rounding differences a different batch shape brings).
- **Compiled decoding** (`compile=True`): the decode step is `torch.compile`d over a static cache (attention over
  all its slots, state in tensors only, a fixed number of tokens per row), so it compiles once per model and batch
  shape and never again (`compiled_graphs()` counts the compilations); the path CUDA graphs need.

The steps, gpt-fast style: `prefill` runs the prompts into the cache; `decode_n_tokens` repeats `decode_one_token`
(`write_next_tokens` picks what every row writes, `decode_step` feeds it to the model) until every row has stopped;
a `DecodeState` carries the cache, the written tokens and each row's progress from one step to the next.

Sampling: the token a row writes at position t is drawn by inverse transform from one uniform number, the (row, t)
entry of a table drawn from `generator` before decoding. So a token that needs no draw (greedy, or the one token a
constraint allows) consumes nothing that other tokens depend on, and jump-forward decoding writes the very tokens of
plain decoding, sampled as well as greedy, given the same seed.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .model import KVCache, Qwen

# allowed_tokens(step, generated) -> bool (batch, vocab) of tokens permitted next, or None for "anything".
# `generated` holds the `step` tokens produced so far (batch, step). Rows advance in lockstep: plain decoding only.
AllowedTokens = Callable[[int, torch.Tensor], "torch.Tensor | None"]
NO_TOKEN = -1  # what a constraint reads for a row that wrote nothing (it stopped, or only other rows jumped ahead)
JUMP_TOKENS = 1  # forced tokens a row may append per step (chains of two happen only once per row, at its end)


class NonFiniteLogits(FloatingPointError):
    """The model produced NaN or infinite logits: generation stops rather than sample from them."""


class TokenConstraint(Protocol):
    """A stateful constraint on every row's next token, advanced one token per row at a time (rows may advance
    unevenly): what jump-forward decoding needs. `forecasting.grammar.NumberGrammar` is one."""

    def allowed(self) -> torch.Tensor | None:
        """(batch, vocab) bool: the tokens each row may write next; None: anything."""

    def read(self, tokens: torch.Tensor) -> None:
        """Each row wrote `tokens` (batch,); NO_TOKEN where a row wrote nothing."""


@dataclass
class DecodeStats:
    """What a `generate` call ran (filled in when passed as `stats=`)."""
    forwards: int = 0  # decode forward passes (the prefill not counted)
    fed_tokens: int = 0  # real tokens fed to them, all rows
    fed_slots: int = 0  # rows x tokens per row of those passes, padding included (a compiled step computes it all)
    forced_tokens: int = 0  # tokens appended without sampling (jump-forward)
    cache_slots: int = 0  # compiled decoding: the static cache's slots, all attended to by every step (else 0)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None,
                uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row of `logits` (batch, vocab): argmax when temperature is 0, else a draw by inverse transform
    from `uniform` (batch,) numbers in [0, 1) (drawn from `generator` when not given). The top token is never lost to
    rounding: a temperature so small that float32 overflows (or rounds it to 0) samples in float64 from the logits'
    distances to their row's top, which the top token's 0 survives (its limit: the top token, ties shared), and
    top-p always keeps the top token, however small p."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = scale_logits(logits, temperature)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the best one always stays.
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop_sorted[:, 0] = False  # a p that rounds to 0 in float32 (1e-50) would drop it too
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if uniform is None:
        uniform = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    return inverse_transform(logits.softmax(-1), uniform)


def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature in float32 (the numbers every ordinary temperature gets); where that overflows a row's
    finite logits (temperature near 0, or below float32's range), the whole batch in float64 from the distances to
    each row's top logit, so the top token keeps 0 and the others go to -inf rather than all becoming NaN."""
    scaled = logits.float() / temperature
    overflowed = (torch.isfinite(logits) & ~torch.isfinite(scaled)).any(-1)
    if not bool(overflowed.any()):
        return scaled
    wide = logits.double()
    return (wide - wide.max(-1, keepdim=True).values) / temperature


def inverse_transform(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The token i of each row with cdf(i - 1) <= u * total < cdf(i): drawn with probability probs[i] / total, and
    never a token of probability 0 (rounding at u close to 1 falls back to the last drawable token)."""
    cdf = probs.cumsum(-1)
    index = torch.searchsorted(cdf, (uniform.to(cdf.dtype) * cdf[:, -1])[:, None], right=True).squeeze(-1)
    last_drawable = probs.shape[-1] - 1 - (probs > 0).flip(-1).long().argmax(-1)
    return torch.minimum(index, last_drawable)


class _LockstepHook:
    """An `allowed_tokens(step, generated)` callable as a TokenConstraint: every row advances one token per read."""

    def __init__(self, fn: AllowedTokens, out: torch.Tensor):
        self.fn, self.out, self.step = fn, out, 0

    def allowed(self):
        return self.fn(self.step, self.out[:, :self.step])

    def read(self, tokens):
        self.step += 1


@torch.inference_mode()
def generate(model: Qwen, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, stop_token_ids: Iterable[int] = (),
             allowed_tokens: TokenConstraint | AllowedTokens | None = None, pad_token_id: int | None = None,
             candidate_ids: torch.Tensor | list[int] | None = None, num_samples: int = 1,
             jump_forward: bool = False, compile: bool = False, stats: DecodeStats | None = None) -> torch.Tensor:
    """New tokens (batch * num_samples, n <= max_new_tokens). A row that produced a stop token is filled with
    `pad_token_id` afterwards (default: the first stop token, else 0); generation ends when every row has stopped.

    allowed_tokens: a TokenConstraint (read/allowed), or a callable `allowed_tokens(step, generated)` (plain
    decoding only).

    candidate_ids: every token that may ever be produced (e.g. all a grammar allows, stop tokens included). The LM
    head is then computed for these rows only; greedy output is identical, sampling draws from the identical
    distribution, and a decode step of a 0.5B model skips a 151,936 x 896 matmul.

    num_samples: rows per prompt (row b * num_samples + k is prompt b's k-th sample). Each prompt is prefilled once
    and its cache shared by its samples' rows, so K samples cost one prefill, not K, and hold one copy of the
    prompt's keys/values, which each decode step reads once for all K.

    jump_forward, compile: see the module docstring; neither changes the tokens written."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, prompt_len>0), got shape {tuple(input_ids.shape)}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = input_ids.device
    stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
    if pad_token_id is None:
        pad_token_id = int(stop_ids[0]) if len(stop_ids) else 0
    B, P = input_ids.shape
    head = model.lm_head.weight
    if candidate_ids is not None:
        candidate_ids = torch.as_tensor(candidate_ids, dtype=torch.long, device=device).unique()
        missing = stop_ids[~torch.isin(stop_ids, candidate_ids)]
        if len(missing):
            raise ValueError(f"stop token(s) {missing.tolist()} are not among candidate_ids")
        head = head[candidate_ids]
    rows = B * num_samples
    out = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    constraint = allowed_tokens
    if allowed_tokens is not None and not hasattr(allowed_tokens, "read"):
        if jump_forward:
            raise ValueError("jump_forward needs a TokenConstraint (read/allowed), not an allowed_tokens callable")
        constraint = _LockstepHook(allowed_tokens, out)
    width = 1 + JUMP_TOKENS if jump_forward else 1  # tokens per row per decode step, at most
    cache_len = P + max_new_tokens + width - 1  # the last step's padding is written past the last real token
    cache, logits = prefill(model, input_ids, attention_mask, head, num_samples, cache_len, compile)
    # Drawn after the prefill, all at once: the (row, t) number is the draw of the token row writes at t.
    uniforms = (torch.rand(rows, max_new_tokens, generator=generator, device=device)
                if temperature > 0 else None)
    stats = stats if stats is not None else DecodeStats()
    stats.cache_slots = cache_len if compile else 0
    state = DecodeState(cache, head, out, stop_ids, pad_token_id, candidate_ids, constraint, uniforms, stats,
                        Sampling(temperature, top_k, top_p), jump_forward, compile)
    decode_n_tokens(model, state, logits)
    return out[:, :int(state.length.max())]


def prefill(model: Qwen, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, head: torch.Tensor,
            num_samples: int, cache_len: int, compile: bool) -> tuple[KVCache, torch.Tensor]:
    """One forward over the prompts (B, P) into a new cache; returns the cache decoding goes on in (room for
    `cache_len` slots, `num_samples` rows per prompt, static when compiled) and the float32 logits (B * num_samples,
    head rows) after each prompt. With several samples (or compiled) the prompts' keys/values are shared, not copied:
    each row gets a cache of its own for the new tokens only (`KVCache.share`)."""
    B, P = input_ids.shape
    # The prompts' cache needs room to grow only when it is the one decoding goes on in.
    in_place = num_samples == 1 and not compile
    cache = model.new_cache(B, cache_len if in_place else P)
    logits = (model.hidden_states(input_ids, attention_mask, kv_cache=cache)[:, -1] @ head.T).float()
    if not in_place:  # the prompts' keys/values stay where they are, shared by their samples' rows
        cache = cache.share(num_samples, suffix_len=cache_len - P, static=compile)
        logits = logits.repeat_interleave(num_samples, dim=0)
    return cache, logits


@dataclass(frozen=True)
class Sampling:
    """How a row's next token is chosen from its logits (see `sample_next`)."""
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None


@dataclass
class DecodeState:
    """What decoding carries from one step to the next: the cache and the LM head rows scored, the tokens each row
    has written (`out`, `length`) and whether it stopped, the constraint and its answer for the rows' current state."""
    cache: KVCache
    head: torch.Tensor  # the LM head rows scored: the candidates' when given, else the whole vocabulary's
    out: torch.Tensor  # (rows, max_new_tokens): the tokens written, pad_token_id elsewhere
    stop_ids: torch.Tensor
    pad_token_id: int
    candidate_ids: torch.Tensor | None
    constraint: TokenConstraint | None
    uniforms: torch.Tensor | None  # (rows, max_new_tokens): the draw of the token each row writes at t; None: greedy
    stats: DecodeStats
    sampling: Sampling
    jump_forward: bool
    compile: bool
    length: torch.Tensor = field(init=False)  # (rows,) tokens written
    finished: torch.Tensor = field(init=False)  # (rows,) stopped: wrote a stop token or max_new_tokens tokens
    asked: dict = field(default_factory=dict)  # the constraint's answer for the rows' current state, asked once

    def __post_init__(self):
        rows, self.max_new_tokens = self.out.shape
        self.row_index = torch.arange(rows, device=self.out.device)
        self.length = torch.zeros(rows, dtype=torch.long, device=self.out.device)
        self.finished = torch.zeros(rows, dtype=torch.bool, device=self.out.device)

    def allowed(self) -> torch.Tensor | None:
        """(rows, candidates or vocab) bool: what the constraint allows each row next; None: anything."""
        if self.constraint is None:
            return None
        if "mask" not in self.asked:
            mask = self.constraint.allowed()
            if mask is not None:
                mask = mask.to(self.out.device)
                mask = mask[:, self.candidate_ids] if self.candidate_ids is not None else mask
            self.asked["mask"] = mask
        return self.asked["mask"]

    def append(self, token: torch.Tensor, writes: torch.Tensor) -> torch.Tensor:
        """Row b writes token[b] where writes[b]; the constraint reads it; a stop token or a full row finishes.
        Returns the rows whose token is to be fed (those that wrote one and go on)."""
        at = self.length.clamp(max=self.max_new_tokens - 1)
        self.out[self.row_index, at] = torch.where(writes, token, self.out[self.row_index, at])
        self.length.add_(writes.long())
        if self.constraint is not None:
            self.constraint.read(torch.where(writes, token, NO_TOKEN))
            self.asked.clear()
        self.finished = (self.finished | (writes & torch.isin(token, self.stop_ids))
                         | (self.length >= self.max_new_tokens))
        return writes & ~self.finished


def decode_n_tokens(model: Qwen, state: DecodeState, logits: torch.Tensor) -> None:
    """Decode steps from the prefill's `logits` until every row has stopped or written max_new_tokens tokens."""
    for step in range(state.max_new_tokens):
        if not bool(torch.isfinite(logits).all()):  # one reduction a step, beside the step's own work
            raise NonFiniteLogits(f"non-finite logits at generated token {step}: the model's weights or activations "
                                  "hold NaN or infinity, so whatever it wrote would be meaningless")
        logits = decode_one_token(model, state, logits)
        if logits is None:
            break


def decode_one_token(model: Qwen, state: DecodeState, logits: torch.Tensor) -> torch.Tensor | None:
    """One decode step: every row that goes on writes its next token (drawn from `logits` within what the constraint
    allows) and, jumping forward, the one token the constraint then allows; the written tokens are fed to the model.
    Returns the logits after each row's last fed token, or None when every row has stopped (nothing is fed)."""
    tokens, real = write_next_tokens(state, logits)
    if bool(state.finished.all()):
        return None
    tokens, real = torch.stack(tokens, dim=1), torch.stack(real, dim=1)
    state.stats.forwards += 1
    state.stats.fed_tokens += int(real.sum())
    state.stats.fed_slots += real.numel()
    step_fn = compiled_decode_step if state.compile else decode_step
    return step_fn(model, state.cache, tokens, real, state.head)


def write_next_tokens(state: DecodeState, logits: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each unfinished row writes the token sampled from its `logits`, then (jump-forward) up to JUMP_TOKENS tokens the
    constraint forces. Returns the tokens to feed, one (rows,) tensor per token slot (pad_token_id where a row feeds
    nothing), and the masks of the rows that feed one."""
    allowed = state.allowed()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    at = state.length.clamp(max=state.max_new_tokens - 1)
    uniform = state.uniforms[state.row_index, at] if state.uniforms is not None else None
    s = state.sampling
    token = sample_next(logits, s.temperature, s.top_k, s.top_p, uniform=uniform)
    if state.candidate_ids is not None:
        token = state.candidate_ids[token]
    fed = state.append(token, ~state.finished)
    chunk, real = [torch.where(fed, token, state.pad_token_id)], [fed]
    for _ in range(JUMP_TOKENS if state.jump_forward else 0):
        choices = state.allowed()
        if choices is None:
            break
        forced = ~state.finished & (choices.sum(-1) == 1)
        if not state.compile and not bool(forced.any()):
            break
        only = choices.long().argmax(-1)
        forced_token = state.candidate_ids[only] if state.candidate_ids is not None else only
        fed = state.append(forced_token, forced)
        chunk.append(torch.where(fed, forced_token, state.pad_token_id))
        real.append(fed)
        state.stats.forced_tokens += int(forced.sum())
    return chunk, real


def decode_step(model: Qwen, cache: KVCache, tokens: torch.Tensor, real: torch.Tensor,
                head: torch.Tensor) -> torch.Tensor:
    """Feed each row's tokens (B, T) (`real` marks them; padding only at the end of a row) and return the float32
    logits (B, head rows) after each row's last real token."""
    hidden = model.hidden_states(tokens, real, kv_cache=cache)
    last = tokens.shape[1] - 1 - real.flip(-1).long().argmax(-1)
    return (hidden[torch.arange(tokens.shape[0], device=tokens.device), last] @ head.T).float()


_compiled = {"step": None, "graphs": 0}


def compiled_graphs() -> int:
    """Graphs compiled so far for compiled decoding (all models, all shapes): a steady count across calls means no
    recompilation."""
    return _compiled["graphs"]


def _counting_inductor(graph_module, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    _compiled["graphs"] += 1
    return compile_fx(graph_module, example_inputs)


def _batch_and_length_vary(cache: KVCache, tokens: torch.Tensor, real: torch.Tensor) -> None:
    """Compile the step for any number of rows and any cache length (one graph for every call of a forecast, whose
    batches differ in rows and prompt length); only the tokens per row stay a constant of the graph."""
    mark = torch._dynamo.maybe_mark_dynamic
    for tensor in (tokens, real, cache.slot_mask, cache.lengths, cache.positions):
        mark(tensor, 0)
    for tensor in (*cache.k, *cache.v, *(cache.prefix.k + cache.prefix.v if cache.prefix is not None else [])):
        mark(tensor, 0)
        mark(tensor, 2)
    mark(cache.slot_mask, 1)
    if cache.prefix is not None:
        mark(cache.prefix.mask, 0)
        mark(cache.prefix.mask, 1)


def compiled_decode_step(model: Qwen, cache: KVCache, tokens: torch.Tensor, real: torch.Tensor,
                         head: torch.Tensor) -> torch.Tensor:
    """decode_step, torch.compile'd (inductor) over a static cache: one graph per model, tokens per row and grad
    mode, whatever the rows and the cache length (`compiled_graphs` counts them)."""
    if _compiled["step"] is None:
        _compiled["step"] = torch.compile(decode_step, backend=_counting_inductor, fullgraph=True)
    if not cache.static:
        raise ValueError("compiled decoding needs a static cache (model.new_cache(..., static=True))")
    _batch_and_length_vary(cache, tokens, real)
    return _compiled["step"](model, cache, tokens, real, head)
