"""What a run trains with, built from its settings: the checks before anything loads (`check_settings`), the
device and precision, the model (adapters injected, activation checkpointing, compiled blocks), the summed-token
loss that DistributedDataParallel wraps, AdamW and the learning-rate schedule."""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as recompute_in_backward

import lora
from common.devices import device_from_flag, dtype_from_flag
from data.lotka_volterra import trajectories_shape
from qwen_mini import load_model_and_tokenizer
from qwen_mini.config import TINY_MODEL_SEED, config_for_model
from qwen_mini.config import ConfigError as ModelConfigError
from qwen_mini.loss import causal_lm_loss

from .config import ConfigError, TrainConfig
from .distributed import Distributed
from .windows import run_split


def check_settings(config: TrainConfig, world_size: int = 1) -> None:
    """Refuse (ConfigError) settings that the model or the data cannot serve, reading only the model's config.json
    and the data file's header: before anything is loaded."""
    if config.batch % world_size:
        raise ConfigError(f"--batch {config.batch} must be divisible by the number of processes ({world_size}): "
                          "each process takes an equal slice of every batch")
    # An accelerator this machine lacks, or a dtype it cannot run: refused here, not on first use.
    resolve_precision(config, resolve_device(config.device, Distributed()))
    try:
        config_for_model(config.model).check_positions(config.ctx, model=config.model)
    except ModelConfigError as e:
        raise ConfigError(str(e)) from None
    if config.data is not None:
        run_split(config, trajectories_shape(config.data), config.data)


def resolve_device(name: str, dist: Distributed) -> torch.device:
    """The device of this process: --device (checked by `device_from_flag`), cuda meaning its local rank's GPU."""
    try:
        device = device_from_flag(name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank)
    return device


@dataclass(frozen=True)
class Precision:
    frozen_dtype: torch.dtype  # weights that are not trained (LoRA's base model)
    autocast_dtype: torch.dtype | None  # None: no autocast, everything in float32
    loss_scaling: bool = False  # float16: dynamic loss scaling (GradScaler), whose overflow steps are skipped

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """float16's dynamic loss scaler; for other precisions a disabled one, whose calls do nothing extra."""
        return torch.amp.GradScaler(device.type, enabled=self.loss_scaling)


def overflow_skipped(scaler: torch.amp.GradScaler, train_loss: float, grad_norm: float) -> bool:
    """Whether float16's loss scaling skips this step: gradients that overflow under a finite loss are the scale's
    doing, not divergence, unless the scale is below 1 already (then they overflow unscaled: divergence)."""
    return (scaler.is_enabled() and math.isfinite(train_loss) and not math.isfinite(grad_norm)
            and scaler.get_scale() >= 1)


def optimizer_step(scaler: torch.amp.GradScaler, optimizer, scheduler) -> None:
    """The optimizer's step (which the scaler skips where the gradients overflowed), the scale's update, and the
    schedule's step, which follows every step, skipped or not; then the gradients are cleared."""
    scaler.step(optimizer)
    scaler.update()
    with warnings.catch_warnings():  # a skipped optimizer step is not the misuse torch warns about
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before", UserWarning)
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def resolve_precision(config: TrainConfig, device: torch.device) -> Precision:
    """float32: everything in float32. bfloat16 (auto's choice on CUDA GPUs that have it): matmuls under bf16
    autocast; a LoRA run also keeps its frozen base weights in bf16 (half the memory). float16 (auto's choice on older
    CUDA GPUs): matmuls under fp16 autocast over float32 weights, with dynamic loss scaling (a step whose gradients
    overflow is skipped and counted). Trained parameters and AdamW's state always stay float32. The names resolve in
    `common.devices.dtype_from_flag` (bfloat16 on MPS: ConfigError)."""
    try:
        dtype = dtype_from_flag(config.dtype, device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if dtype == "float32":
        return Precision(torch.float32, None)
    if dtype == "float16":
        return Precision(torch.float32, torch.float16, loss_scaling=True)
    return Precision(torch.float32 if config.full else torch.bfloat16, torch.bfloat16)


def build_training_model(config: TrainConfig, device: torch.device, precision: Precision):
    """(model in train mode with only the trained parameters requiring grad, tokenizer)."""
    model, tokenizer = load_model_and_tokenizer(config.model, dtype=precision.frozen_dtype, device=device,
                                                seed=TINY_MODEL_SEED)
    torch.manual_seed(config.seed)  # the adapters' initialisation, then dropout
    if config.full:
        model.requires_grad_(True)
    else:
        lora.inject(model, config.rank, config.alpha, config.targets, config.lora_dropout)
        lora.adapters_to_float32(model)
    if config.activation_checkpointing:
        enable_activation_checkpointing(model)
    if config.compile:
        compile_blocks(model)
    return model.train(), tokenizer


def compile_blocks(model: nn.Module) -> int:
    """torch.compile every decoder block in place (adapters and activation checkpointing included). The blocks share
    one code object, so they share compiled graphs: one for the first block (its input needs no gradient), one for
    the others, one more for evaluation without gradients. The chunked loss stays eager. Returns the blocks."""
    blocks = list(model.model.layers)
    for block in blocks:
        block.compile()
    return len(blocks)


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Keep only each decoder block's input in training and recompute the block in the backward pass (for long
    contexts). Done by wrapping each block's forward, so the model's code and module tree stay as they are.
    Returns the number of blocks wrapped."""
    blocks = list(model.model.layers)
    for block in blocks:
        if not getattr(block, "recomputes_activations", False):
            block.forward = functools.partial(_checkpointed_block, block.forward)
            block.recomputes_activations = True
    return len(blocks)


def _checkpointed_block(forward, x, cos, sin, mask, kv_cache=None):
    if kv_cache is not None or not torch.is_grad_enabled():
        return forward(x, cos, sin, mask, kv_cache)  # generation / evaluation: nothing to save for backward
    return recompute_in_backward(forward, x, cos, sin, mask, use_reentrant=False)


class SummedTokenLoss(nn.Module):
    """The summed next-token loss of a batch as a module's forward, so that DistributedDataParallel can wrap it
    (DDP synchronises gradients only for work done inside its forward)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(self.model, input_ids, labels, reduction="sum")


def summed_token_loss(model: nn.Module, dist: Distributed, device: torch.device) -> nn.Module:
    """The model's SummedTokenLoss, wrapped in DistributedDataParallel under torchrun."""
    loss_module = SummedTokenLoss(model)
    if dist.enabled:
        loss_module = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    return loss_module


def build_optimizer(config: TrainConfig, trainable: list[nn.Parameter]):
    """(AdamW over the trained parameters, its learning-rate schedule: see lr_factor)."""
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, config=config))
    return optimizer, scheduler


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of --lr for step `step` (0-based): linear warmup over --warmup steps, then constant, or a cosine
    decay that reaches 0 at --steps, or wsd (warmup-stable-decay, Hägele et al. 2024; MiniCPM): constant up to
    config.stable_steps, then 1 - sqrt((step - stable_steps) / decay_steps), which reaches 0 at --steps. The
    1 - sqrt shape is the cooldown Hägele et al. found best (below linear and cosine cooldowns in loss at equal
    length): it stays high longer than a linear decay and drops fast at the end. Up to the decay's start wsd is the
    constant schedule, value for value (its warmup included), so a constant run continues into it exactly."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    if config.schedule == "cosine":
        progress = (step - config.warmup) / (config.steps - config.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if config.schedule == "wsd" and step > config.stable_steps:
        return 1.0 - math.sqrt(min((step - config.stable_steps) / config.decay_steps, 1.0))
    return 1.0
