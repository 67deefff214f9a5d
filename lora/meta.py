"""A weightless model carrying the adapters a run trains: what training's and flops.py's FLOP counts are read from."""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from qwen_mini import QwenConfig
from qwen_mini.model import meta_model

from .layer import inject


def lora_model_on_meta(config: QwenConfig, rank: int, alpha: float | None = None,
                       targets: Iterable[str] = ("q_proj", "v_proj"), dropout: float = 0.0) -> nn.Module:
    """The model of `config` on the meta device (every shape, no weights allocated) with LoRA adapters injected as
    training injects them, only they trainable; rank 0: no adapters, every parameter trainable (full fine-tuning)."""
    model = meta_model(config)
    if rank:
        inject(model, rank, alpha, targets, dropout)
    return model
