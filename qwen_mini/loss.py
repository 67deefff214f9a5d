"""Next-token cross-entropy without materialising float32 logits for the whole window.

Full-vocabulary logits are the largest activation of a small model with Qwen's 151,936-token vocabulary
(batch 4 x 512 x 151,936 floats = 1.2 GB in fp32). The loss here runs the LM head over chunks of positions and
recomputes each chunk's logits in the backward pass instead of keeping them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .model import Qwen

IGNORE_INDEX = -100


def _chunk_loss_sum(lm_head_weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, lm_head_weight).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def causal_lm_loss(model: Qwen, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[:, t+1] from positions <= t (labels aligned with input_ids, HF
    convention); positions labelled -100 are ignored. Equal to the plain `F.cross_entropy` over full logits."""
    hidden = model.hidden_states(input_ids, attention_mask)[:, :-1].reshape(-1, model.config.hidden_size)
    targets = labels[:, 1:].reshape(-1)
    n_valid = (targets != IGNORE_INDEX).sum()
    weight = model.lm_head.weight
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, weight, h, t, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(weight, h, t)
    return total / n_valid.clamp(min=1)
