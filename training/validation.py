"""The validation loss of a run: the mean next-token loss over the fixed validation windows, and the same loss over
only the last N targets of each window (`val_loss_last` in metrics.jsonl).

The mean over whole windows depends on the context length: early positions of a window see little history, so a
longer window scores lower even for an untrained model (lv-tiny on the users' file: 0.438 at ctx 256, 0.278 at ctx
768). The last-N losses score the same number of target tokens per window at every context length, each with at
least ctx - N tokens of history, so runs at different context lengths are compared on equal terms at the largest N
they all have (`study.plan.best_run`). N runs over the powers of two from LAST_TARGETS_MIN up to the window's
targets; they come from the same forward pass (no FLOPs beyond the validation pass the ledger books).
"""
from __future__ import annotations

import torch
from torch import nn

from data.dataset import IGNORE_INDEX
from qwen_mini.loss import token_losses

from .distributed import Distributed
from .setup import Precision
from .windows import RunData, gather

LAST_TARGETS_MIN = 8


def last_target_counts(ctx: int) -> list[int]:
    """The N of the last-N losses of a run at context `ctx` (ctx - 1 targets per window): powers of two."""
    counts, n = [], LAST_TARGETS_MIN
    while n <= ctx - 1:
        counts.append(n)
        n *= 2
    return counts


def last_targets_mask(labels: torch.Tensor, n: int) -> torch.Tensor:
    """[batch, seq - 1] booleans: the last `n` scored targets of each window (padding skipped)."""
    valid = labels[:, 1:] != IGNORE_INDEX
    from_end = valid.flip(1).cumsum(1).flip(1)  # 1 at the last valid target, 2 at the one before, ...
    return valid & (from_end <= n)


@torch.no_grad()
def validation_losses(model: nn.Module, run_data: RunData, batch: int, device, precision: Precision,
                      dist: Distributed, ctx: int) -> tuple[float, dict[str, float]]:
    """Mean next-token loss over the fixed validation windows (each process takes every world_size-th one), and
    {str(N): mean loss over the last N targets of each window} for N in `last_target_counts(ctx)`."""
    was_training = model.training
    model.eval()
    counts = last_target_counts(ctx)
    rows = run_data.val_rows[dist.rank::dist.world_size]
    total = torch.zeros(2 + 2 * len(counts), dtype=torch.float64, device=device)  # (sum, tokens) of all, each N
    for start in range(0, len(rows), batch):
        input_ids, labels = gather(run_data.val, rows[start:start + batch], device)
        with precision.autocast(device):
            losses = token_losses(model, input_ids, labels).double()
        total[0] += losses.sum()
        total[1] += (labels[:, 1:] != IGNORE_INDEX).sum()
        for i, n in enumerate(counts):
            mask = last_targets_mask(labels, n)
            total[2 + 2 * i] += losses[mask].sum()
            total[3 + 2 * i] += mask.sum()
    model.train(was_training)
    sums = dist.all_reduce_sum(total).tolist()
    last = {str(n): sums[2 + 2 * i] / max(sums[3 + 2 * i], 1) for i, n in enumerate(counts)}
    return sums[0] / max(sums[1], 1), last
