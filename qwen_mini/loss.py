"""Next-token cross-entropy without materialising float32 logits for the whole window.

Full-vocabulary logits are the largest activation of a small model with Qwen's 151,936-token vocabulary
(batch 4 x 512 x 151,936 floats = 1.2 GB in fp32, plus as much again for their gradient). Here the LM head runs over
chunks of positions and each chunk's gradient is formed right away (softmax minus one-hot), so only one chunk of
logits ever exists and nothing is recomputed in the backward pass: the same matmuls as the plain loss, a fraction
of the memory.
"""
from __future__ import annotations

import torch

from .model import Qwen

IGNORE_INDEX = -100


class LinearCrossEntropy(torch.autograd.Function):
    """sum over valid rows of cross_entropy(hidden @ weight.T, targets), gradients computed chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int):
        need_weight_grad = ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # One float32 buffer reused by every chunk: on CPU a fresh ~100 MB tensor per chunk costs more in page
        # faults than the softmax itself.
        rows = min(chunk_size, hidden.shape[0])
        buffer = torch.empty((rows, weight.shape[0]), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
            logits = buffer[:len(t)]
            if h.dtype == torch.float32:
                torch.mm(h, weight.T, out=logits)
            else:
                logits.copy_(h @ weight.T)
            valid = t != IGNORE_INDEX
            safe_t = t.clamp(min=0)
            rows_idx = torch.arange(len(t), device=t.device)
            # log-sum-exp and softmax in place: max, subtract, exp, sum (no second vocab-sized tensor)
            row_max = logits.amax(-1, keepdim=True)
            target_logit = logits[rows_idx, safe_t] - row_max.squeeze(1)
            probs = logits.sub_(row_max).exp_()
            row_sum = probs.sum(-1)
            total += ((row_sum.log() - target_logit) * valid).sum()
            if grad_hidden is None and not need_weight_grad:
                continue
            # d(loss)/d(logits) = softmax - one_hot, zero on ignored rows
            grad_logits = probs.mul_((valid / row_sum)[:, None])
            grad_logits[rows_idx, safe_t] -= valid.to(grad_logits.dtype)
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_size] = grad_logits @ weight
            if need_weight_grad:
                grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def causal_lm_loss(model: Qwen, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, chunk_size: int = 1024,
                   reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting labels[:, t+1] from positions <= t (labels aligned with input_ids, HF
    convention); positions labelled -100 are ignored. Equal to the plain `F.cross_entropy` over full logits.
    reduction "sum" gives the summed loss (for averaging over tokens of several processes)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    hidden = model.hidden_states(input_ids, attention_mask)[:, :-1].reshape(-1, model.config.hidden_size)
    targets = labels[:, 1:].reshape(-1)
    if torch.is_grad_enabled():
        total = LinearCrossEntropy.apply(hidden, model.lm_head.weight, targets, chunk_size)
    else:
        total = LinearCrossEntropy.forward(_NoGradContext(), hidden, model.lm_head.weight, targets, chunk_size)
    return total if reduction == "sum" else total / (targets != IGNORE_INDEX).sum().clamp(min=1)


class _NoGradContext:
    """Stands in for autograd's ctx when no gradient is wanted (evaluation): nothing extra is computed or kept."""
    needs_input_grad = (False, False, False, False)

    def save_for_backward(self, *tensors):
        pass


@torch.no_grad()
def token_losses(model: Qwen, input_ids: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Next-token loss at every position, [batch, seq - 1] in float32, 0 where the target is ignored: the terms
    `causal_lm_loss(..., reduction="sum")` adds up (the same matmuls), kept apart so that a subset of positions can be
    scored — e.g. the last N targets of each window, the same positions at every context length."""
    hidden = model.hidden_states(input_ids)[:, :-1]
    targets = labels[:, 1:]
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    losses = torch.zeros(flat_targets.shape, dtype=torch.float32, device=hidden.device)
    weight = model.lm_head.weight
    for start in range(0, len(flat_targets), chunk_size):
        t = flat_targets[start:start + chunk_size]
        logits = (flat_hidden[start:start + chunk_size] @ weight.T).float()
        loss = torch.logsumexp(logits, -1) - logits.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
        losses[start:start + chunk_size] = loss * (t != IGNORE_INDEX)
    return losses.view(targets.shape)
