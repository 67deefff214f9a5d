"""Batched forecasting of many trajectories with `qwen_mini.generate`: one left-padded batch of prompts per call,
KV cache, the number grammar (or, unconstrained, a per-row step counter), K samples per trajectory, and decoding
back to original units with each trajectory's own context-fitted scaler. Each call's FLOPs are counted from what it
ran (prompt shape, rows, tokens generated; `qwen_mini.flops.generation_flops`), and `generation_plan` counts the
same calls before they run (an upper bound, or an estimate from the targets' lengths)."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from common.progress import progress_bar
from data.dataset import EvalExample
from data.llmtime import ParseReport, decode, encode
from qwen_mini import generate
from qwen_mini.flops import GenerationFlops, generation_counter, generation_flops, static_decode_flops
from qwen_mini.generate import JUMP_TOKENS, DecodeStats

from .config import DEFAULT_MEMORY_GB
from .grammar import NumberGrammar, StepCounter, grammar_chars, max_forecast_tokens
from .metering import ReportingConstraint


@dataclass
class Forecast:
    index: int  # trajectory index in the data file
    samples: np.ndarray  # (K, horizon, V) original units; NaN from the step where a sample stopped parsing
    reports: list[ParseReport]  # one per sample
    texts: list[str]  # the generated text of each sample

    @property
    def complete_samples(self) -> np.ndarray:
        """(k, horizon, V): the samples that parsed to the full horizon."""
        return self.samples[np.isfinite(self.samples).all(axis=(1, 2))]

    @property
    def median(self) -> np.ndarray:
        """(horizon, V) point forecast: the median of the complete samples (the only sample when greedy); NaN when
        none is complete, so a failed forecast is reported, never scored as if it were one."""
        complete = self.complete_samples
        return np.median(complete, axis=0) if len(complete) else np.full(self.samples.shape[1:], np.nan)

    def band(self, low: float = 10, high: float = 90) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) percentiles over the complete samples, each (horizon, V)."""
        complete = self.complete_samples
        if not len(complete):
            nan = np.full(self.samples.shape[1:], np.nan)
            return nan, nan
        return np.percentile(complete, low, axis=0), np.percentile(complete, high, axis=0)

    @property
    def parse_failures(self) -> int:
        """Samples that did not parse to the full horizon."""
        return len(self.samples) - len(self.complete_samples)


@dataclass
class GenerationStats:
    new_tokens: int = 0  # tokens the rows generated, each row's stop token included, padding after it not
    seconds: float = 0.0  # wall time inside generate (prefill + decoding)
    calls: int = 0  # generate calls
    prefill_tokens: int = 0  # prompts x padded prompt length, summed over calls
    decode_tokens: int = 0  # rows x tokens fed back (finished rows included), summed over calls
    prefill_flops: int = 0
    decode_flops: int = 0

    @property
    def flops(self) -> int:
        return self.prefill_flops + self.decode_flops

    def count(self, flops: GenerationFlops) -> None:
        self.calls += 1
        self.prefill_tokens += flops.prefill_tokens
        self.decode_tokens += flops.decode_tokens
        self.prefill_flops += flops.prefill
        self.decode_flops += flops.decode

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def forecast_examples(model, tokenizer, examples: list[EvalExample], *, decimals: int = 2, batch: int | None = None,
                      memory_gb: float = DEFAULT_MEMORY_GB,
                      constrained: bool = True, num_samples: int = 1, temperature: float = 0.0,
                      top_p: float | None = None, seed: int = 0, int_digits: int = 3, allow_negative: bool = False,
                      progress: bool = True, label: str = "forecast", stats: GenerationStats | None = None,
                      gqa: str = "real", on_flops: Callable[[GenerationFlops], None] | None = None,
                      jump_forward: bool = False, compile: bool = False) -> list[Forecast]:
    """Forecast each example's horizon (the length of its target) from its prompt; one Forecast per example.

    `batch` counts generated rows (trajectories x samples) per generate call (None: as many as `memory_gb` holds,
    `rows_per_call`); a call holds all samples of its trajectories and prefills each prompt once for them, or, when
    one trajectory's samples exceed the rows, some of its samples (`call_plan`). Greedy when temperature is 0;
    otherwise `num_samples` draws per trajectory from one torch.Generator seeded with `seed`. With `constrained`
    every sample parses to exactly the horizon; without, whatever the model writes is decoded and the failures are
    reported in each Forecast's `reports`. `label` names the progress bar, which counts the forecast steps the rows
    complete inside each call (`ProgressConstraint`; a line per tenth in a log): a long call is not silent. Each
    call's FLOPs
    (counted with `gqa`) are added to `stats` and handed to `on_flops` (e.g. to book them in the ledger); while the
    call runs, on_flops also gets its `FlopsSoFar` (forecasting.metering), so a killed forecast has booked them.
    `jump_forward` and `compile` choose how `qwen_mini.generate` decodes; neither changes the tokens."""
    if num_samples < 1 or (batch is not None and batch < 1):
        raise ValueError(f"num_samples and batch must be >= 1, got num_samples={num_samples}, batch={batch}")
    if num_samples > 1 and temperature <= 0:
        raise ValueError("several samples per trajectory need a temperature > 0 (greedy samples are all the same)")
    if not examples:
        return []
    shapes = {ex.target.shape for ex in examples}
    if len(shapes) > 1:
        raise ValueError(f"all examples must share one (horizon, n_vars), got {sorted(shapes)}")
    (horizon, n_vars), = shapes
    stats = stats if stats is not None else GenerationStats()
    device = model.lm_head.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    max_new_tokens = max_forecast_tokens(horizon, n_vars, decimals, int_digits, allow_negative)
    longest_prompt = max(len(tokenizer.encode(ex.prompt)) for ex in examples)
    head_rows = grammar_candidates(allow_negative) if constrained else None
    rows_each = rows_per_call(model, longest_prompt, max_new_tokens, num_samples, batch=batch, memory_gb=memory_gb,
                              head_rows=head_rows)
    texts: list[list[str]] = [[] for _ in examples]  # by position: the same trajectory may be asked for twice
    calls = call_plan(len(examples), num_samples, rows_each)
    bar = progress_bar(total=len(calls) * horizon, desc=label, unit="steps", disable=not progress)
    for number, (start, stop, samples) in enumerate(calls, start=1):
        if len(calls) > 1:
            bar.set_postfix(call=f"{number}/{len(calls)}")
        chunk = examples[start:stop]
        rows = len(chunk) * samples
        input_ids, attention_mask = tokenizer.encode_batch([ex.prompt for ex in chunk])
        if constrained:
            hook = NumberGrammar(tokenizer, model.config.vocab_size, rows, n_vars, horizon, decimals,
                                 int_digits, allow_negative, device=device)
            candidate_ids = hook.candidate_ids
        else:
            hook = StepCounter(tokenizer, model.config.vocab_size, rows, horizon, device=device)
            candidate_ids = None
        began = time.perf_counter()
        decode = DecodeStats()
        head_rows = len(candidate_ids) if candidate_ids is not None else None
        counter = generation_counter(model, len(chunk), input_ids.shape[1], rows, gqa=gqa, head_rows=head_rows)
        constraint = hook if on_flops is None else ReportingConstraint(  # FLOPs so far reach on_flops as it runs
            hook, decode, lambda forwards, counter=counter: counter.at(forwards + 1), on_flops)
        constraint = ProgressConstraint(constraint, hook, bar, horizon)
        tokens = generate(model, input_ids.to(device), attention_mask.to(device), num_samples=samples,
                          max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, generator=generator, stop_token_ids=[hook.stop_id],
                          allowed_tokens=constraint, candidate_ids=candidate_ids, jump_forward=jump_forward,
                          compile=compile, stats=decode)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats.seconds += time.perf_counter() - began
        constraint.finish()
        flops = counter.at(tokens.shape[1])
        if decode.cache_slots:  # compiled: what the fixed-shape steps computed, padding and all
            flops = replace(flops, decode=static_decode_flops(
                model, rows, decode.forwards, decode.fed_slots // max(rows * decode.forwards, 1), decode.cache_slots,
                gqa=gqa, head_rows=head_rows))
        stats.count(flops)
        if on_flops is not None:
            on_flops(flops)
        for row_index, row in enumerate(tokens.tolist()):
            if hook.stop_id in row:
                row = row[:row.index(hook.stop_id)]
                stats.new_tokens += 1  # the stop token was generated too
            stats.new_tokens += len(row)
            texts[start + row_index // samples].append(tokenizer.decode(row, skip_special_tokens=True))
    bar.close()
    return [to_forecast(ex, ex_texts, decimals) for ex, ex_texts in zip(examples, texts)]


class ProgressConstraint:
    """A token constraint for `generate` (NumberGrammar, StepCounter, or one wrapping them) that moves `bar` by the
    forecast steps the call's rows complete, on average, as it runs (`grammar.steps`: the per-row count of completed
    steps, out of `horizon` each): progress inside one call, which may run for minutes. It only reads; the tokens are
    the wrapped constraint's. `finish()` at the call's end moves the bar to the call's full `horizon` (rows that
    stopped early without the grammar)."""

    def __init__(self, constraint, grammar, bar, horizon: int):
        self.constraint, self.grammar, self.bar, self.horizon = constraint, grammar, bar, horizon
        self.shown = 0

    def allowed(self):
        return self.constraint.allowed()

    def read(self, tokens) -> None:
        self.constraint.read(tokens)
        steps = self.grammar.steps
        done = int(steps.clamp(max=self.horizon).sum()) // len(steps)
        if done > self.shown:
            self.bar.update(done - self.shown)
            self.shown = done

    def finish(self) -> None:
        if self.shown < self.horizon:
            self.bar.update(self.horizon - self.shown)
            self.shown = self.horizon


def call_plan(trajectories: int, num_samples: int, rows: int) -> list[tuple[int, int, int]]:
    """The generate calls of a forecast, each (first trajectory, one past the last, samples of each): `rows` rows
    per call hold all samples of as many trajectories as fit; when one trajectory's samples do not fit, its samples
    are split over several calls (not all held at once)."""
    if rows >= num_samples:
        per_call = rows // num_samples
        return [(start, min(start + per_call, trajectories), num_samples)
                for start in range(0, trajectories, per_call)]
    return [(index, index + 1, min(rows, num_samples - done))
            for index in range(trajectories) for done in range(0, num_samples, rows)]


@dataclass(frozen=True)
class CallMemory:
    """Bytes a generate call holds at its peak, affine in its prompts and rows: `per_prompt` (the prompt's shared
    keys/values, the prefill's activations and attention mask) and `per_row` (the row's own keys/values for the new
    tokens, its logits, its attention scores over prompt + new tokens, its draws and tokens). An estimate with room
    to spare: activations are counted for all layers' widths at once, every transient as held together."""
    per_prompt: int
    per_row: int

    def of(self, prompts: int, rows: int) -> int:
        return prompts * self.per_prompt + rows * self.per_row


def call_memory(model, prompt_len: int, new_tokens: int, head_rows: int | None = None) -> CallMemory:
    """`CallMemory` of generating `new_tokens` after prompts of `prompt_len` tokens with `model` (shapes only)."""
    return architecture_memory(model.config, model.lm_head.weight.element_size(), prompt_len, new_tokens, head_rows)


def architecture_memory(c, element: int, prompt_len: int, new_tokens: int, head_rows: int | None = None
                        ) -> CallMemory:
    """`call_memory` from a model's config (QwenConfig) and the bytes of one weight, before any weight is loaded."""
    kv_position = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * element  # keys + values
    width = 1 + JUMP_TOKENS  # tokens a row feeds per step, at most
    prefill_token = (4 * c.hidden_size + 3 * c.intermediate_size + c.num_attention_heads * c.head_dim) * element
    per_prompt = prompt_len * (kv_position + prefill_token) + 5 * prompt_len * prompt_len  # mask: bool + float
    head = c.vocab_size if head_rows is None else head_rows
    scores = 3 * c.num_attention_heads * width * (prompt_len + new_tokens + width) * 4  # float32, 3 live copies
    per_row = (new_tokens + width) * kv_position + 3 * head * 4 + scores + new_tokens * (4 + 8)
    return CallMemory(per_prompt, per_row)


def rows_per_call(model, prompt_len: int, new_tokens: int, num_samples: int, *, batch: int | None = None,
                  memory_gb: float = DEFAULT_MEMORY_GB, head_rows: int | None = None) -> int:
    """Rows of each generate call: `batch` when given, else as many as `memory_gb` holds (`call_memory`): all
    samples of as many trajectories as fit, else as many samples of one trajectory as fit. GenerationTooLarge when
    not even one prompt and one row fit (`check_call_fits`)."""
    if batch is not None:
        return batch
    memory, budget = call_memory(model, prompt_len, new_tokens, head_rows), memory_gb * 2 ** 30
    trajectories = int(budget // memory.of(1, num_samples))
    if trajectories >= 1:
        return trajectories * num_samples
    check_call_fits(model.config, model.lm_head.weight.element_size(), prompt_len, new_tokens, memory_gb, head_rows)
    return int((budget - memory.per_prompt) // memory.per_row)


class GenerationTooLarge(ValueError):
    """A forecast whose generate calls cannot fit the memory budget or the model's positions."""


def check_call_fits(config, element: int, prompt_len: int, new_tokens: int, memory_gb: float,
                    head_rows: int | None = None, at_least: bool = False) -> None:
    """GenerationTooLarge unless a prompt of `prompt_len` tokens and `new_tokens` generated after it fit the model's
    positions (max_position_embeddings; RoPE past them is a model it never was) and one such row fits `memory_gb`
    (`architecture_memory`): a generate call holds at least that, whatever the batch. `at_least`: the prompt
    length is a lower bound (before the tokenizer has read the prompts), and the message says so."""
    prompt = f"{'at least ' if at_least else ''}{prompt_len:,}"
    positions = prompt_len + new_tokens
    if positions > config.max_position_embeddings:
        raise GenerationTooLarge(
            f"a prompt of {prompt} tokens and a forecast of up to {new_tokens:,} take {positions:,} positions, more "
            f"than the {config.max_position_embeddings:,} of the model (max_position_embeddings in its config.json): "
            "use a shorter --context or --horizon, or fewer --decimals")
    need = architecture_memory(config, element, prompt_len, new_tokens, head_rows).of(1, 1)
    if need > memory_gb * 2 ** 30:
        raise GenerationTooLarge(
            f"one prompt of {prompt} tokens and one row of its forecast ({new_tokens:,} tokens) hold about "
            f"{need / 2 ** 30:.3g} GiB in a generate call, over --memory-budget {memory_gb:g} GiB: use a shorter "
            "--context or --horizon, fewer --decimals, or a larger --memory-budget")


def shortest_prompt(context: int, n_vars: int, decimals: int) -> int:
    """Tokens of the shortest prompt of `context` steps, one token per character as LLMTIME numbers are tokenized:
    every number one integer digit (and its point and decimals), one separator after it."""
    return context * n_vars * (1 + (decimals + 1 if decimals else 0) + 1)


def held_samples_bytes(trajectories: int, num_samples: int, new_tokens: int, horizon: int, n_vars: int) -> int:
    """About what a forecast keeps of its samples until it is scored: each sample's text (a str of up to
    `new_tokens` characters, which one token can exceed, so twice that) and its parsed values with their
    completeness mask and ranks as float64 (three copies)."""
    text = 2 * new_tokens + 64  # CPython's str header
    values = 3 * horizon * n_vars * 8
    return trajectories * num_samples * (text + values)


def check_samples_fit(trajectories: int, num_samples: int, new_tokens: int, horizon: int, n_vars: int,
                      memory_gb: float) -> None:
    """ValueError when the samples a forecast keeps (`held_samples_bytes`) exceed `memory_gb`: generation is split
    into calls, but every sample is held until the scores are computed."""
    held = held_samples_bytes(trajectories, num_samples, new_tokens, horizon, n_vars)
    if held > memory_gb * 2 ** 30:
        most = int(memory_gb * 2 ** 30 // held_samples_bytes(trajectories, 1, new_tokens, horizon, n_vars))
        fewer = f"use at most {most} samples, fewer" if most >= 1 else "use fewer"  # not "at most 0 samples"
        raise ValueError(f"--num-samples {num_samples} for {trajectories} trajectories holds about "
                         f"{held / 2 ** 30:.2g} GiB of samples until they are scored, over --memory-budget "
                         f"{memory_gb:g} GiB: {fewer} trajectories (--limit), or a larger --memory-budget")


def grammar_candidates(allow_negative: bool = False) -> int:
    """Tokens the number grammar can produce (NumberGrammar.candidate_ids): its characters and the stop token; the LM
    head of a constrained forecast scores only these."""
    return len(grammar_chars(allow_negative)) + 1


def generation_plan(model, prompt_tokens: list[int], new_tokens: list[int], *, batch: int | None = None,
                    memory_gb: float = DEFAULT_MEMORY_GB, num_samples: int = 1, constrained: bool = True,
                    allow_negative: bool = False,
                    gqa: str = "real", jump_forward: bool = False, compile: bool = False) -> int:
    """FLOPs of `forecast_examples` on examples whose prompts are `prompt_tokens` long, if each batch generates the
    largest of its examples' `new_tokens` (the rows of a batch decode until the last one stops): pass every
    example's `max_forecast_tokens` for an upper bound, or its target text's length + 1 for an estimate. `model`
    may be a meta-device model (only shapes are read). With `compile`, a bound: every step computes its full width
    (2 tokens a row with `jump_forward`) against the whole static cache, one step per new token."""
    if len(prompt_tokens) != len(new_tokens):
        raise ValueError(f"one prompt length and one token count per example, got {len(prompt_tokens)} and "
                         f"{len(new_tokens)}")
    if not prompt_tokens:
        return 0
    head_rows = grammar_candidates(allow_negative) if constrained else None
    rows_each = rows_per_call(model, max(prompt_tokens), max(new_tokens), num_samples, batch=batch,
                              memory_gb=memory_gb, head_rows=head_rows)
    total = 0
    for start, stop, samples in call_plan(len(prompt_tokens), num_samples, rows_each):
        prompts = prompt_tokens[start:stop]
        rows, longest = len(prompts) * samples, max(new_tokens[start:stop])
        flops = generation_flops(model, len(prompts), max(prompts), rows, longest, gqa=gqa, head_rows=head_rows)
        if compile:
            width = 1 + JUMP_TOKENS if jump_forward else 1  # generate's static cache: prompt + new + width - 1
            flops = replace(flops, decode=static_decode_flops(model, rows, longest - 1, width,
                                                              max(prompts) + longest + width - 1, gqa=gqa,
                                                              head_rows=head_rows))
        total += flops.total
    return total


def target_tokens(example: EvalExample, decimals: int) -> int:
    """Characters of the example's target in LLMTIME text with its step separator after every step, + the stop
    token: what a forecast that writes numbers as wide as the truth generates (one token per character, as the
    number grammar requires)."""
    return len(encode(example.target, example.scaler, decimals)) + 1 + 1


def to_forecast(example: EvalExample, texts: list[str], decimals: int) -> Forecast:
    """Decode each sample's text with the example's scaler: its first `horizon` well-formed steps, NaN after."""
    horizon, n_vars = example.target.shape
    samples = np.full((len(texts), horizon, n_vars), np.nan)
    reports = []
    for k, text in enumerate(texts):
        values, report = decode(text, example.scaler, decimals=decimals)
        samples[k, :min(horizon, len(values))] = values[:horizon]
        reports.append(report)
    return Forecast(example.index, samples, reports, texts)
