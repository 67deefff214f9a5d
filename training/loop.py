"""One training run: LoRA (or full) fine-tuning on LLMTIME windows, checked against the FLOP budget, resumable.

`train_run(config)` does, in order: decide where the run starts (fresh, or its checkpoint with --resume), refuse it
if its remaining FLOPs do not fit the budget (before any data or weights are loaded), build the model and data,
then step: forward + backward on the step's batch, gradient clipping, AdamW, the learning-rate schedule. It logs
every step, evaluates every `eval_every` steps, checkpoints every `checkpoint_every` steps, and at the end saves
the adapter (or all weights) and the loss curve. Under torchrun each process trains on its slice of every batch.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as recompute_in_backward
from tqdm import tqdm

import lora
from qwen_mini import QwenConfig, load_model_and_tokenizer, save_pretrained
from qwen_mini.budget import RECORD_NAME, check_budget, read_ledger, write_run_record
from qwen_mini.fileio import atomic_write, write_json_atomic
from qwen_mini.flops import count_forward, meta_model
from qwen_mini.hub import resolve_dir
from qwen_mini.loss import causal_lm_loss

from .checkpoint import read_checkpoint, restore_checkpoint, save_checkpoint
from .config import TINY_MODEL_SEED, TRAJECTORY_KEYS, ConfigError, TrainConfig
from .distributed import Distributed
from .plot import plot_losses
from .run import (ADAPTER_DIR, CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME, MODEL_DIR, PLOT_NAME, RunDirError,
                  read_metrics, read_run_config)
from .windows import RunData, batch_rows, data_position, gather, load_run_data, target_tokens

# Files whose presence means a run directory already holds a run.
RUN_FILES = (CONFIG_NAME, METRICS_NAME, CHECKPOINT_NAME, RECORD_NAME)
# Steps averaged for the "final train loss" of summaries (one step's loss is noisy).
FINAL_TRAIN_STEPS = 10


# ---- planning: before anything is loaded ---------------------------------------------------------------------------

def model_config_of(spec: str) -> QwenConfig:
    """The architecture behind `--model`, read without loading weights (a hub model: only its config.json)."""
    if str(spec) == "tiny":
        return QwenConfig.from_name("tiny")
    return QwenConfig.from_hf(resolve_dir(spec, ["config.json"]) / "config.json")


def per_step_flops(config: TrainConfig) -> int:
    """Training FLOPs of one step of this run (all processes together), counted on a weightless model with the
    run's adapters. Activation checkpointing runs every decoder block's forward a second time in the backward pass:
    that recomputation is real work and is counted too."""
    model = meta_model(model_config_of(config.model))
    if not config.full:
        lora.inject(model, config.rank, config.alpha, config.targets, config.lora_dropout)
    report = count_forward(model, config.batch, config.ctx)
    recompute = report.select(lambda row: row.layer.startswith("layers.")) if config.activation_checkpointing else 0
    return report.step + recompute


@dataclass(frozen=True)
class StartPoint:
    step: int  # steps already done (0 for a fresh run)
    flops_used: int  # FLOPs the run's ledger record already counts (steps lost to a crash included)


def start_point(config: TrainConfig) -> StartPoint:
    """Where the run in config.run_dir starts, after checking that the directory fits the request: a fresh run needs
    a directory without a run in it; --resume continues from the checkpoint (or from step 0 if the run was stopped
    before its first one) and needs the same settings as the run it continues."""
    run_dir = config.run_dir
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not config.resume:
        if existing:
            raise RunDirError(f"{run_dir} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
                              "or choose another directory with --out")
        return StartPoint(0, 0)
    if (run_dir / CONFIG_NAME).is_file():
        check_same_trajectory(read_run_config(run_dir), config.trajectory_values(), run_dir / CONFIG_NAME)
    state = read_checkpoint(run_dir, mmap=True)
    step = 0 if state is None else int(state["step"])
    if step > config.steps:
        raise RunDirError(f"{run_dir}: the checkpoint is at step {step}, past --steps {config.steps}")
    flops_used = sum(row.flops_used for row in read_ledger(run_dir)) if (run_dir / RECORD_NAME).is_file() else 0
    return StartPoint(step, flops_used)


def check_same_trajectory(saved: dict, wanted: dict, where) -> None:
    different = [key for key in TRAJECTORY_KEYS if key in saved and saved[key] != wanted[key]]
    if different:
        details = ", ".join(f"{key}: run has {saved[key]!r}, now {wanted[key]!r}" for key in different)
        raise RunDirError(f"{where}: cannot resume with different settings ({details}); pass the run's own values "
                          "or start a new run in another --out")


def prepare_run(config: TrainConfig) -> tuple[StartPoint, int]:
    """(start point, FLOPs per step), refusing with BudgetExceeded if the steps still to do do not fit."""
    start = start_point(config)
    per_step = per_step_flops(config)
    if not config.run_dir.resolve().is_relative_to(Path(config.runs_dir).resolve()):
        print(f"train.py: note: {config.run_dir} is outside --runs-dir {config.runs_dir}: the budget ledger there will "
              "not count this run's FLOPs", file=sys.stderr)
    check_budget((config.steps - start.step) * per_step, config.runs_dir, config.max_flops, per_step_flops=per_step)
    return start, per_step


# ---- model, precision, loss ----------------------------------------------------------------------------------------

def resolve_device(name: str, dist: Distributed) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank)
    return device


@dataclass(frozen=True)
class Precision:
    frozen_dtype: torch.dtype  # weights that are not trained (LoRA's base model)
    autocast_dtype: torch.dtype | None  # None: no autocast, everything in float32

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


def resolve_precision(config: TrainConfig, device: torch.device) -> Precision:
    """float32: everything in float32. bfloat16 (the default on CUDA): matmuls under bf16 autocast; a LoRA run also
    keeps its frozen base weights in bf16 (half the memory), while trained parameters and AdamW's state always stay
    float32."""
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    if dtype == "float32":
        return Precision(torch.float32, None)
    return Precision(torch.float32 if config.full else torch.bfloat16, torch.bfloat16)


def build_model(config: TrainConfig, device: torch.device, precision: Precision):
    """(model in train mode with only the trained parameters requiring grad, tokenizer)."""
    model, tokenizer = load_model_and_tokenizer(config.model, dtype=precision.frozen_dtype, device=device,
                                                seed=TINY_MODEL_SEED)
    torch.manual_seed(config.seed)  # the adapters' initialisation, then dropout
    if config.full:
        model.requires_grad_(True)
    else:
        lora.inject(model, config.rank, config.alpha, config.targets, config.lora_dropout)
        for _, layer in lora.lora_layers(model):
            layer.lora_A.float()
            layer.lora_B.float()
    if config.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model.train(), tokenizer


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


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of --lr for step `step` (0-based): linear warmup over --warmup steps, then constant or a cosine
    decay that reaches 0 at --steps."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    if config.schedule == "cosine":
        progress = (step - config.warmup) / (config.steps - config.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


@torch.no_grad()
def validation_loss(model: nn.Module, run_data: RunData, batch: int, device, precision: Precision,
                    dist: Distributed) -> float:
    """Mean next-token loss over the fixed validation windows (each process takes every world_size-th one)."""
    was_training = model.training
    model.eval()
    rows = run_data.val_rows[dist.rank::dist.world_size]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for start in range(0, len(rows), batch):
        input_ids, labels = gather(run_data.val, rows[start:start + batch], device)
        with precision.autocast(device):
            total[0] += causal_lm_loss(model, input_ids, labels, reduction="sum").double()
        total[1] += target_tokens(labels)
    model.train(was_training)
    loss_sum, tokens = dist.all_reduce_sum(total).tolist()
    return loss_sum / max(tokens, 1)


# ---- the run -------------------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    run_dir: Path
    config: TrainConfig
    steps_done: int
    per_step_flops: int
    flops_used: int  # what the ledger counts for this run (steps redone after a crash included)
    metrics: list[dict]
    model: nn.Module | None = field(default=None, repr=False)  # the trained model, on rank 0
    tokenizer: object = field(default=None, repr=False)

    @property
    def val_losses(self) -> list[tuple[int, float]]:
        return [(m["step"], m["val_loss"]) for m in self.metrics if m.get("val_loss") is not None]

    def summary_row(self) -> dict:
        train = [m["train_loss"] for m in self.metrics if m.get("train_loss") is not None]
        val = self.val_losses
        return {
            "run": self.run_dir.name, "run_dir": str(self.run_dir), "lr": self.config.lr,
            "rank": None if self.config.full else self.config.rank, "ctx": self.config.ctx,
            "steps": self.steps_done,
            "final_train_loss": sum(train[-FINAL_TRAIN_STEPS:]) / len(train[-FINAL_TRAIN_STEPS:]) if train else None,
            "initial_val_loss": val[0][1] if val and val[0][0] == 0 else None,
            "final_val_loss": val[-1][1] if val else None,
            "best_val_loss": min(v for _, v in val) if val else None,
            "per_step_flops": self.per_step_flops, "flops_used": self.flops_used,
        }


StepHook = Callable[[int, dict], None]


def train_run(config: TrainConfig, *, dist: Distributed | None = None, hooks: Iterable[StepHook] = (),
              progress: bool = True) -> RunResult:
    """Train one run to config.steps (from its checkpoint with config.resume) and return what it did.

    `hooks` are called as hook(step, metrics_entry) after every logged step, on every process."""
    dist = dist or Distributed()
    run_dir = config.run_dir
    run_name = run_dir.name  # in the ledger and summaries: the directory, which a custom --out may name differently
    if config.batch % dist.world_size:
        raise ConfigError(f"--batch {config.batch} must be divisible by the number of processes ({dist.world_size}): "
                          "each process takes an equal slice of every batch")
    start, per_step = dist.on_main(prepare_run, config)

    device = resolve_device(config.device, dist)
    precision = resolve_precision(config, device)
    model, tokenizer = build_model(config, device, precision)
    run_data = load_run_data(config, tokenizer)
    trainable = lora.trainable_parameters(model)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, config=config))
    if start.step:
        state = read_checkpoint(run_dir)
        check_same_trajectory(state["trajectory"], config.trajectory_values(), run_dir / CHECKPOINT_NAME)
        if state["data_position"]["n_windows"] != len(run_data.train):
            raise RunDirError(f"{run_dir}: the checkpoint was trained on {state['data_position']['n_windows']} "
                              f"windows, the data now gives {len(run_data.train)}: the data file changed")
        restore_checkpoint(state, model=model, optimizer=optimizer, scheduler=scheduler)
        del state
    loss_module = SummedTokenLoss(model)
    if dist.enabled:
        loss_module = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)

    if dist.is_main:
        write_json_atomic(run_dir / CONFIG_NAME, {
            "run_name": run_name, **config.to_dict(), **run_data.describe(),
            "model_seed": TINY_MODEL_SEED if config.model == "tiny" else None,
            # A local --model as an absolute path, so load_run finds it from any working directory.
            "model_dir": str(Path(config.model).resolve()) if Path(config.model).is_dir() else None,
            "model_config": model.config.to_hf(), "trainable_params": sum(p.numel() for p in trainable),
            "total_params": sum(p.numel() for p in model.parameters()), "per_step_flops": per_step,
            "planned_flops": per_step * config.steps, "world_size": dist.world_size, "device_used": str(device),
            "torch_version": torch.__version__})
        kept = [m for m in read_metrics(run_dir) if start.step and m["step"] <= start.step]
        atomic_write(run_dir / METRICS_NAME, lambda tmp: Path(tmp).write_text("".join(json.dumps(m) + "\n"
                                                                                     for m in kept)))
    flops_used = start.flops_used

    def log(entry: dict) -> None:
        if dist.is_main:
            with open(run_dir / METRICS_NAME, "a") as f:
                f.write(json.dumps(entry) + "\n")
            write_run_record(run_dir, run_name=run_name, flops_used=flops_used, per_step_flops=per_step,
                             steps_done=entry["step"], planned_flops=per_step * config.steps,
                             config=config.to_dict())
        for hook in hooks:
            hook(entry["step"], entry)

    def evaluate() -> float:
        return validation_loss(model, run_data, config.batch // dist.world_size, device, precision, dist)

    if start.step == 0:
        log({"step": 0, "train_loss": None, "val_loss": evaluate(), "lr": config.lr * lr_factor(0, config),
             "grad_norm": None, "flops": 0, "tokens_per_s": None})
    local = slice(dist.rank * config.batch // dist.world_size, (dist.rank + 1) * config.batch // dist.world_size)
    bar = tqdm(total=config.steps, initial=start.step, desc=run_name, unit="step", dynamic_ncols=True,
               disable=not (progress and dist.is_main))
    last_val = None
    for step in range(start.step + 1, config.steps + 1):
        began = time.perf_counter()
        rows = batch_rows(step - 1, len(run_data.train), config.batch, config.seed)
        tokens = target_tokens(run_data.train.labels[rows])  # of the global batch, which every process knows
        input_ids, labels = gather(run_data.train, rows[local], device)
        lr = optimizer.param_groups[0]["lr"]
        with precision.autocast(device):
            loss_sum = loss_module(input_ids, labels)
        # DDP averages the processes' gradients; scaling each process's summed loss by world_size / (the global
        # batch's tokens) makes that average the gradient of the mean loss over every token of the global batch,
        # exactly what a single process computes.
        (loss_sum * dist.world_size / max(tokens, 1)).backward()
        grad_norm = nn.utils.clip_grad_norm_(trainable, config.grad_clip if config.grad_clip > 0 else math.inf)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = dist.all_reduce_sum(loss_sum.detach().double()).item() / max(tokens, 1)
        seconds = time.perf_counter() - began
        flops_used += per_step
        entry = {"step": step, "train_loss": train_loss, "val_loss": None, "lr": lr, "grad_norm": float(grad_norm),
                 "flops": step * per_step, "tokens_per_s": config.batch * config.ctx / seconds}
        if step % config.eval_every == 0 or step == config.steps:
            entry["val_loss"] = last_val = evaluate()
        log(entry)
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.4f}", **({"val": f"{last_val:.4f}"} if last_val is not None else {}),
                        lr=f"{lr:.2e}", tok_s=f"{entry['tokens_per_s']:.0f}")
        if dist.is_main and ((config.checkpoint_every and step % config.checkpoint_every == 0)
                             or step == config.steps):
            save_checkpoint(run_dir, model=model, optimizer=optimizer, scheduler=scheduler, step=step,
                            data_position=data_position(step, len(run_data.train), config.batch),
                            flops_used=flops_used, trajectory=config.trajectory_values())
    bar.close()

    metrics = []
    if dist.is_main:
        if config.full:
            save_pretrained(model, run_dir / MODEL_DIR)
            tokenizer.save_pretrained(run_dir / MODEL_DIR)
        else:
            lora.save_adapter(model, run_dir / ADAPTER_DIR, base_model_name_or_path=config.model)
        metrics = read_metrics(run_dir)
        plot_losses(metrics, run_dir / PLOT_NAME, title=run_name)
    dist.barrier()
    return RunResult(run_dir, config, config.steps, per_step, flops_used, metrics,
                     model if dist.is_main else None, tokenizer)
