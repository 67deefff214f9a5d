"""Batched forecasting of many trajectories with `qwen_mini.generate`: one left-padded batch of prompts per call,
KV cache, the number grammar (or, unconstrained, a per-row step counter), K samples per trajectory, and decoding
back to original units with each trajectory's own context-fitted scaler. Each call's FLOPs are counted from what it
ran (prompt shape, rows, tokens generated; `qwen_mini.flops.generation_flops`), and `generation_plan` counts the
same calls before they run (an upper bound, or an estimate from the targets' lengths)."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from data.dataset import EvalExample
from data.llmtime import ParseReport, decode, encode
from qwen_mini import generate
from qwen_mini.flops import GenerationFlops, generation_flops, static_decode_flops
from qwen_mini.generate import JUMP_TOKENS, DecodeStats

from .grammar import NumberGrammar, StepCounter, grammar_chars, max_forecast_tokens


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


def forecast_examples(model, tokenizer, examples: list[EvalExample], *, decimals: int = 2, batch: int = 16,
                      constrained: bool = True, num_samples: int = 1, temperature: float = 0.0,
                      top_p: float | None = None, seed: int = 0, int_digits: int = 3, allow_negative: bool = False,
                      progress: bool = True, label: str = "forecast", stats: GenerationStats | None = None,
                      gqa: str = "real", on_flops: Callable[[GenerationFlops], None] | None = None,
                      jump_forward: bool = False, compile: bool = False) -> list[Forecast]:
    """Forecast each example's horizon (the length of its target) from its prompt; one Forecast per example.

    `batch` counts generated rows (trajectories x samples) per generate call; a call holds all samples of its
    trajectories (so at least one trajectory's), and prefills each prompt once for them. Greedy when temperature is 0;
    otherwise `num_samples` draws per trajectory from one torch.Generator seeded with `seed`. With `constrained`
    every sample parses to exactly the horizon; without, whatever the model writes is decoded and the failures are
    reported in each Forecast's `reports`. `label` names the progress bar (one step per batch). Each call's FLOPs
    (counted with `gqa`) are added to `stats` and handed to `on_flops` (e.g. to book them in the ledger).
    `jump_forward` and `compile` choose how `qwen_mini.generate` decodes; neither changes the tokens."""
    if num_samples < 1 or batch < 1:
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
    per_call = trajectories_per_call(batch, num_samples)
    texts: list[list[str]] = [[] for _ in examples]  # by position: the same trajectory may be asked for twice
    for start in tqdm(range(0, len(examples), per_call), desc=label, unit="batch", disable=not progress):
        chunk = examples[start:start + per_call]
        rows = len(chunk) * num_samples
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
        tokens = generate(model, input_ids.to(device), attention_mask.to(device), num_samples=num_samples,
                          max_new_tokens=max_forecast_tokens(horizon, n_vars, decimals, int_digits, allow_negative),
                          temperature=temperature, top_p=top_p, generator=generator, stop_token_ids=[hook.stop_id],
                          allowed_tokens=hook, candidate_ids=candidate_ids, jump_forward=jump_forward,
                          compile=compile, stats=decode)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats.seconds += time.perf_counter() - began
        head_rows = len(candidate_ids) if candidate_ids is not None else None
        flops = generation_flops(model, len(chunk), input_ids.shape[1], rows, tokens.shape[1], gqa=gqa,
                                 head_rows=head_rows)
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
            texts[start + row_index // num_samples].append(tokenizer.decode(row, skip_special_tokens=True))
    return [to_forecast(ex, ex_texts, decimals) for ex, ex_texts in zip(examples, texts)]


def trajectories_per_call(batch: int, num_samples: int) -> int:
    """Trajectories per generate call: `batch` rows hold all samples of their trajectories, at least one's."""
    return max(1, batch // num_samples)


def grammar_candidates(allow_negative: bool = False) -> int:
    """Tokens the number grammar can produce (NumberGrammar.candidate_ids): its characters and the stop token; the LM
    head of a constrained forecast scores only these."""
    return len(grammar_chars(allow_negative)) + 1


def generation_plan(model, prompt_tokens: list[int], new_tokens: list[int], *, batch: int = 16,
                    num_samples: int = 1, constrained: bool = True, allow_negative: bool = False,
                    gqa: str = "real", jump_forward: bool = False, compile: bool = False) -> int:
    """FLOPs of `forecast_examples` on examples whose prompts are `prompt_tokens` long, if each batch generates the
    largest of its examples' `new_tokens` (the rows of a batch decode until the last one stops): pass every
    example's `max_forecast_tokens` for an upper bound, or its target text's length + 1 for an estimate. `model`
    may be a meta-device model (only shapes are read). With `compile`, a bound: every step computes its full width
    (2 tokens a row with `jump_forward`) against the whole static cache, one step per new token."""
    if len(prompt_tokens) != len(new_tokens):
        raise ValueError(f"one prompt length and one token count per example, got {len(prompt_tokens)} and "
                         f"{len(new_tokens)}")
    per_call, total = trajectories_per_call(batch, num_samples), 0
    head_rows = grammar_candidates(allow_negative) if constrained else None
    for start in range(0, len(prompt_tokens), per_call):
        prompts = prompt_tokens[start:start + per_call]
        rows, longest = len(prompts) * num_samples, max(new_tokens[start:start + per_call])
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
