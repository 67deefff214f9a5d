"""Batched forecasting of many trajectories with `qwen_mini.generate`: one left-padded batch of prompts per call,
KV cache, the number grammar (or, unconstrained, a per-row step counter), K samples per trajectory, and decoding
back to original units with each trajectory's own context-fitted scaler."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from data.dataset import EvalExample
from data.llmtime import ParseReport, decode
from qwen_mini import generate

from .grammar import NumberGrammar, StepCounter, max_forecast_tokens


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

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def forecast_examples(model, tokenizer, examples: list[EvalExample], *, decimals: int = 2, batch: int = 16,
                      constrained: bool = True, num_samples: int = 1, temperature: float = 0.0,
                      top_p: float | None = None, seed: int = 0, int_digits: int = 3, allow_negative: bool = False,
                      progress: bool = True, label: str = "forecast", stats: GenerationStats | None = None
                      ) -> list[Forecast]:
    """Forecast each example's horizon (the length of its target) from its prompt; one Forecast per example.

    `batch` counts generated rows (trajectories x samples) per generate call; a call holds all samples of its
    trajectories (so at least one trajectory's), and prefills each prompt once for them. Greedy when temperature is 0;
    otherwise `num_samples` draws per trajectory from one torch.Generator seeded with `seed`. With `constrained`
    every sample parses to exactly the horizon; without, whatever the model writes is decoded and the failures are
    reported in each Forecast's `reports`. `label` names the progress bar (one step per batch)."""
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
    per_call = max(1, batch // num_samples)  # trajectories per generate call
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
        tokens = generate(model, input_ids.to(device), attention_mask.to(device), num_samples=num_samples,
                          max_new_tokens=max_forecast_tokens(horizon, n_vars, decimals, int_digits, allow_negative),
                          temperature=temperature, top_p=top_p, generator=generator, stop_token_ids=[hook.stop_id],
                          allowed_tokens=hook, candidate_ids=candidate_ids)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats.seconds += time.perf_counter() - began
        for row_index, row in enumerate(tokens.tolist()):
            if hook.stop_id in row:
                row = row[:row.index(hook.stop_id)]
                stats.new_tokens += 1  # the stop token was generated too
            stats.new_tokens += len(row)
            texts[start + row_index // num_samples].append(tokenizer.decode(row, skip_special_tokens=True))
    return [to_forecast(ex, ex_texts, decimals) for ex, ex_texts in zip(examples, texts)]


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
