"""Token windows for training, and the context/target split used for evaluation.

Both fit each trajectory's scaler on its first `n_context` (training: `fit_steps`) steps only, so training text and
evaluation prompts are scaled by the same rule and no evaluation prompt carries information about its target.
Windows: each trajectory's text is tokenized on its own, cut into windows of `ctx` tokens every `stride` tokens,
the last window right-padded with the tokenizer's pad id and labelled -100 there (ignored by the loss). Labels are
aligned with input_ids (the loss shifts them).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .llmtime import Scaler, encode, format_prompt

IGNORE_INDEX = -100
DEFAULT_CONTEXT, DEFAULT_HORIZON = 50, 50


def window_starts(n_tokens: int, ctx: int, stride: int) -> list[int]:
    """Starts of the windows covering n_tokens: every `stride`, the last one reaching the end."""
    starts = [0]
    while starts[-1] + ctx < n_tokens:
        starts.append(starts[-1] + stride)
    return starts


class TrainWindows(Dataset):
    def __init__(self, trajectories: np.ndarray, tokenizer, ctx: int, stride: int | None = None, decimals: int = 2,
                 fit_steps: int = DEFAULT_CONTEXT):
        stride = ctx // 2 if stride is None else stride
        if ctx < 2 or not 0 < stride <= ctx:
            raise ValueError(f"need ctx >= 2 and 0 < stride <= ctx, got ctx={ctx}, stride={stride}")
        self.ctx, self.stride, self.decimals, self.fit_steps = ctx, stride, decimals, fit_steps
        windows, self.windows_per_trajectory = [], []
        for trajectory in np.asarray(trajectories):
            scaler = Scaler.fit(trajectory[:fit_steps])
            tokens = tokenizer.encode(encode(trajectory, scaler, decimals))
            starts = window_starts(len(tokens), ctx, stride)
            self.windows_per_trajectory.append(len(starts))
            windows.extend(tokens[s:s + ctx] for s in starts)
        self.input_ids = torch.full((len(windows), ctx), tokenizer.pad_id, dtype=torch.long)
        self.labels = torch.full((len(windows), ctx), IGNORE_INDEX, dtype=torch.long)
        for row, window in enumerate(windows):
            self.input_ids[row, :len(window)] = torch.tensor(window)
            self.labels[row, :len(window)] = torch.tensor(window)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens in all windows."""
        return int((self.labels != IGNORE_INDEX).sum())


def shuffled_order(n: int, seed: int, epoch: int = 0) -> np.ndarray:
    """A permutation of range(n) that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass
class EvalExample:
    index: int  # trajectory index in the data file
    context: np.ndarray  # (n_context, V) original units
    target: np.ndarray  # (horizon, V) original units
    scaler: Scaler  # fitted on `context` only
    prompt: str  # LLMTIME text of the context, ending with the step separator


def make_eval_example(trajectory: np.ndarray, index: int, n_context: int = DEFAULT_CONTEXT,
                      horizon: int = DEFAULT_HORIZON, decimals: int = 2) -> EvalExample:
    trajectory = np.asarray(trajectory, dtype=np.float64)
    if n_context <= 0 or horizon <= 0 or n_context + horizon > len(trajectory):
        raise ValueError(f"trajectory {index} has {len(trajectory)} steps: cannot take a context of {n_context} and "
                         f"a horizon of {horizon} (both must be > 0 and fit)")
    context, target = trajectory[:n_context], trajectory[n_context:n_context + horizon]
    scaler = Scaler.fit(context)
    return EvalExample(index, context, target, scaler, format_prompt(context, scaler, decimals))
