"""The data a run trains and validates on, and which windows make up each step's batch.

The batch of step s (0-based) is a pure function of (seed, s): the windows at stream positions s*batch ...
(s+1)*batch - 1, where the stream is an epoch-seeded permutation of the training windows, epoch after epoch. A
resumed run therefore needs nothing but the step number to continue the data exactly where it stopped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data.dataset import IGNORE_INDEX, TrainWindows, shuffled_order
from data.lotka_volterra import LVData, Split, default_data_path, load_or_simulate, split_indices

from .config import FIT_STEPS, ConfigError, TrainConfig


@dataclass
class RunData:
    source: str  # the h5 file the trajectories came from
    data: LVData
    split: Split
    train: TrainWindows  # windows of the train-split trajectories
    val: TrainWindows  # windows of the val-split trajectories
    val_rows: np.ndarray  # the fixed subset of `val` every evaluation uses

    def describe(self) -> dict:
        """What config.json records about the data."""
        return {"data_source": self.source, "data_shape": list(self.data.trajectories.shape),
                "split": self.split.to_dict(), "fit_steps": FIT_STEPS, "train_windows": len(self.train),
                "val_windows": len(self.val), "val_windows_used": len(self.val_rows)}


def load_run_data(config: TrainConfig, tokenizer) -> RunData:
    """Trajectories, their seeded train/val/test split, and the windows of the train and val trajectories."""
    data = load_or_simulate(config.data)
    split = run_split(config, data.trajectories.shape, data.path)

    def windows(indices):
        return TrainWindows(data.trajectories[indices], tokenizer, config.ctx, config.stride, config.decimals,
                            fit_steps=FIT_STEPS, scaler=config.scaler)

    train, val = windows(split.train), windows(split.val)
    source = data.path or str(default_data_path())
    return RunData(source, data, split, train, val, validation_rows(len(val), config.val_batches * config.batch))


def run_split(config: TrainConfig, shape: tuple[int, ...], where) -> Split:
    """The run's train/val/test split of data of `shape` (N, T, 2), refusing (ConfigError) data that cannot make a
    run: trajectories shorter than the FIT_STEPS their scaler is fitted on, or too few to give both a train and a
    val split. Needs only the shape, so train.py checks this before loading anything."""
    n, steps = shape[0], shape[1]
    if steps < FIT_STEPS:
        raise ConfigError(f"{where}: its trajectories have {steps} steps; training needs at least {FIT_STEPS} (each "
                          f"trajectory's LLMTIME scaler is fitted on its first {FIT_STEPS}, the forecast context)")
    split = split_indices(n, seed=config.split_seed, mode=config.split_mode)
    if len(split.train) == 0 or len(split.val) == 0:
        raise ConfigError(f"{where}: {n} trajectories leave the train or val split empty "
                          f"(train {len(split.train)}, val {len(split.val)}); the data needs more trajectories")
    return split


def validation_rows(n_windows: int, count: int) -> np.ndarray:
    """`count` window indices spread evenly over the val windows (all of them if there are fewer): a fixed subset
    that covers every part of the split, the same at every evaluation and in every run with the same data."""
    if count >= n_windows:
        return np.arange(n_windows)
    return np.linspace(0, n_windows - 1, count).round().astype(np.int64)


def batch_rows(step: int, n_windows: int, batch: int, seed: int) -> np.ndarray:
    """Window indices of the global batch of step `step` (0-based)."""
    positions = np.arange(step * batch, (step + 1) * batch)
    epochs, offsets = np.divmod(positions, n_windows)
    rows = np.empty(batch, dtype=np.int64)
    for epoch in np.unique(epochs):
        here = epochs == epoch
        rows[here] = shuffled_order(n_windows, seed, int(epoch))[offsets[here]]
    return rows


def data_position(step: int, n_windows: int, batch: int) -> dict:
    """Where the window stream stands after `step` steps (recorded in checkpoints)."""
    seen = step * batch
    return {"windows_seen": seen, "epoch": seen // n_windows, "offset": seen % n_windows, "n_windows": n_windows}


def gather(windows: TrainWindows, rows: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.as_tensor(rows)
    return windows.input_ids[index].to(device), windows.labels[index].to(device)


def count_loss_tokens(labels: torch.Tensor) -> int:
    """The target tokens of a batch of windows, those the loss is computed on: every labelled position except the
    first of each window."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
