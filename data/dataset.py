"""Token windows for training, and the context/target split used for evaluation.

Scaling: both fit each trajectory's scaler on its first steps only — training on the first `fit_steps`, evaluation
on the `n_context` steps of the prompt — so with fit_steps == n_context a training text and an evaluation prompt of
the same trajectory are scaled identically, and no evaluation prompt carries information about its target. Both take
the scaling rule by name (`scaler`: data.llmtime.scaling_rule; default "p95"): whatever the rule, it sees only those
steps.

Windows: each trajectory's text is tokenized on its own (windows never mix trajectories), cut into windows of `ctx`
tokens starting every `stride` tokens (the last window reaches the end of the text), and a window shorter than
`ctx` is right-padded with the tokenizer's pad id. `labels` equal `input_ids` (the loss shifts them, as in Hugging
Face) except IGNORE_INDEX (-100) at padding, so padding never enters the loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .llmtime import DEFAULT_SCALER, Scaler, ScalingRule, encode, format_prompt, scaling_rule

IGNORE_INDEX = -100
DEFAULT_CONTEXT, DEFAULT_HORIZON = 50, 50


def window_starts(n_tokens: int, ctx: int, stride: int) -> list[int]:
    """Token offsets of the windows covering n_tokens: 0, stride, 2*stride, ... up to the first one that reaches
    the end (one window when the text fits in ctx)."""
    starts = [0]
    while starts[-1] + ctx < n_tokens:
        starts.append(starts[-1] + stride)
    return starts


class TrainWindows(Dataset):
    """Fixed-length training windows of the LLMTIME texts of `trajectories` (N, T, V).

    Items are {"input_ids": LongTensor (ctx,), "labels": LongTensor (ctx,)}; the default collate stacks them.
    `eos` appends the tokenizer's eos token to each trajectory's text (labelled, so a model learns to stop there).
    It is off by default: forecasts end after a fixed number of steps, and a stop learned from the training texts'
    length would only say "stop after T steps"."""

    def __init__(self, trajectories: np.ndarray, tokenizer, ctx: int, stride: int | None = None, decimals: int = 2,
                 fit_steps: int = DEFAULT_CONTEXT, eos: bool = False, scaler: str | ScalingRule = DEFAULT_SCALER):
        stride = ctx // 2 if stride is None else stride
        if ctx < 2 or not 0 < stride <= ctx:
            raise ValueError(f"TrainWindows needs ctx >= 2 and 0 < stride <= ctx, got ctx={ctx}, stride={stride}")
        trajectories = np.asarray(trajectories)
        if trajectories.ndim != 3:
            raise ValueError(f"TrainWindows needs trajectories of shape (N, T, V), got {trajectories.shape}")
        if not 1 <= fit_steps <= trajectories.shape[1]:
            raise ValueError(f"TrainWindows: fit_steps={fit_steps} must be between 1 and the trajectories' length "
                             f"T={trajectories.shape[1]}")
        if eos and tokenizer.eos_id is None:
            raise ValueError("TrainWindows(eos=True): the tokenizer has no eos token")
        self.ctx, self.stride, self.decimals, self.fit_steps, self.eos = ctx, stride, decimals, fit_steps, eos
        self.rule = scaling_rule(scaler)
        windows, self.windows_per_trajectory = [], []
        for trajectory in trajectories:
            scaler = self.rule.fit(trajectory[:fit_steps])  # the trajectory's first steps only, as at evaluation
            tokens = tokenizer.encode(encode(trajectory, scaler, decimals)) + ([tokenizer.eos_id] if eos else [])
            starts = window_starts(len(tokens), ctx, stride)
            self.windows_per_trajectory.append(len(starts))
            windows.extend(tokens[s:s + ctx] for s in starts)
        self.input_ids = torch.full((len(windows), ctx), tokenizer.pad_id, dtype=torch.long)
        # Labels are set by position, not by comparing ids with pad_id, so a pad id that is also a real token
        # (e.g. pad == eos) still keeps its real occurrences in the loss.
        self.labels = torch.full((len(windows), ctx), IGNORE_INDEX, dtype=torch.long)
        for row, window in enumerate(windows):
            self.input_ids[row, :len(window)] = torch.tensor(window, dtype=torch.long)
            self.labels[row, :len(window)] = torch.tensor(window, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens in all windows (overlapping windows count shared tokens once per window)."""
        return int((self.labels != IGNORE_INDEX).sum())


def shuffled_order(n: int, seed: int, epoch: int = 0) -> np.ndarray:
    """A permutation of range(n) that depends only on (n, seed, epoch), never on global random state."""
    if n < 0:
        raise ValueError(f"shuffled_order needs n >= 0, got {n}")
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass
class EvalExample:
    index: int  # trajectory index in the data file
    context: np.ndarray  # (n_context, V) original units
    target: np.ndarray  # (horizon, V) original units
    scaler: Scaler  # fitted on `context` only, by the forecast's scaling rule
    prompt: str  # LLMTIME text of the context, ending with the step separator


class TooShort(ValueError):
    """Trajectories shorter than a forecast's context + horizon: the data's fault, to be refused before any work."""


def check_forecast_fits(n_steps: int, n_context: int, horizon: int, what: str) -> None:
    """Raise TooShort unless trajectories of `n_steps` steps (`what` names them: a file, a trajectory) hold a
    forecast's context of `n_context` steps and its horizon after it (ValueError if either is not > 0)."""
    if n_context <= 0 or horizon <= 0:
        raise ValueError(f"{what}: a context of {n_context} and a horizon of {horizon}: both must be > 0")
    if n_context + horizon > n_steps:
        raise TooShort(f"{what} has {n_steps} steps: cannot take a context of {n_context} and a horizon of {horizon} "
                       f"({n_context + horizon} steps; both must fit): forecast with a context and a horizon that "
                       f"add up to at most {n_steps}, or give data with longer trajectories")


def make_eval_example(trajectory: np.ndarray, index: int, n_context: int = DEFAULT_CONTEXT,
                      horizon: int = DEFAULT_HORIZON, decimals: int = 2,
                      scaler: str | ScalingRule = DEFAULT_SCALER) -> EvalExample:
    """Split trajectory (T, V) into its first `n_context` steps (the prompt) and the next `horizon` (the target).
    The scaler (rule `scaler`) sees the context only, so the prompt is the same whatever the target holds."""
    trajectory = np.asarray(trajectory, dtype=np.float64)
    if trajectory.ndim != 2:
        raise ValueError(f"trajectory {index}: expected shape (T, V), got {trajectory.shape}")
    check_forecast_fits(len(trajectory), n_context, horizon, f"trajectory {index}")
    # Copies: the example must not change if the caller later edits its array.
    context, target = trajectory[:n_context].copy(), trajectory[n_context:n_context + horizon].copy()
    fitted = scaling_rule(scaler).fit(context)
    return EvalExample(index, context, target, fitted, format_prompt(context, fitted, decimals))
