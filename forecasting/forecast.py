"""Batched forecasting of many trajectories with `qwen_mini.generate`: prompts from the context, KV cache, the
number grammar, K samples per trajectory, and decoding back to original units."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from data.dataset import EvalExample
from data.llmtime import ParseReport, decode
from qwen_mini import generate

from .grammar import NumberGrammar


@dataclass
class Forecast:
    index: int
    samples: np.ndarray  # (K, horizon, V) original units; NaN where a sample failed to parse that far
    reports: list[ParseReport]  # one per sample
    texts: list[str]

    @property
    def median(self) -> np.ndarray:
        return np.median(self.samples, axis=0)  # NaN where a sample failed: such forecasts are reported, not scored

    def band(self, low: float = 10, high: float = 90) -> tuple[np.ndarray, np.ndarray]:
        return np.percentile(self.samples, low, axis=0), np.percentile(self.samples, high, axis=0)

    @property
    def complete(self) -> bool:
        """Every sample parsed to the full horizon."""
        return bool(np.isfinite(self.samples).all())


@dataclass
class GenerationStats:
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def forecast_examples(model, tokenizer, examples: list[EvalExample], *, decimals: int = 2, batch: int = 16,
                      constrained: bool = True, num_samples: int = 1, temperature: float = 0.0,
                      top_p: float | None = None, seed: int = 0, progress: bool = True,
                      stats: GenerationStats | None = None) -> list[Forecast]:
    """Forecast each example's horizon from its prompt. `batch` counts generated rows (trajectories x samples)."""
    if num_samples > 1 and temperature <= 0:
        raise ValueError("several samples per trajectory need --temperature > 0 (greedy samples are identical)")
    stats = stats if stats is not None else GenerationStats()
    device = model.lm_head.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    rows = [(ex, k) for ex in examples for k in range(num_samples)]
    texts: dict[int, list[str]] = {ex.index: [] for ex in examples}
    for start in tqdm(range(0, len(rows), batch), desc="forecast", unit="batch", disable=not progress):
        chunk = rows[start:start + batch]
        chunk_examples = [ex for ex, _ in chunk]
        horizon, n_vars = chunk_examples[0].target.shape
        input_ids, attention_mask = tokenizer.encode_batch([ex.prompt for ex in chunk_examples])
        grammar = NumberGrammar(tokenizer, model.config.vocab_size, len(chunk), n_vars, horizon, decimals)
        began = time.perf_counter()
        tokens = generate(model, input_ids.to(device), attention_mask.to(device),
                          max_new_tokens=grammar.max_new_tokens(), temperature=temperature, top_p=top_p,
                          generator=generator, stop_token_ids=[grammar.stop_id],
                          allowed_tokens=grammar if constrained else None,
                          candidate_ids=grammar.candidate_ids if constrained else None)
        stats.seconds += time.perf_counter() - began
        for (ex, _), row in zip(chunk, tokens.tolist()):
            row = row[:row.index(grammar.stop_id)] if grammar.stop_id in row else row
            stats.new_tokens += len(row) + 1
            texts[ex.index].append(tokenizer.decode(row, skip_special_tokens=True))
    return [to_forecast(ex, texts[ex.index], decimals) for ex in examples]


def to_forecast(example: EvalExample, texts: list[str], decimals: int) -> Forecast:
    horizon, n_vars = example.target.shape
    samples = np.full((len(texts), horizon, n_vars), np.nan)
    reports = []
    for k, text in enumerate(texts):
        values, report = decode(text, example.scaler, decimals=decimals)
        samples[k, :min(horizon, len(values))] = values[:horizon]
        reports.append(report)
    return Forecast(example.index, samples, reports, texts)
