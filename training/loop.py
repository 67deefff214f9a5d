"""One training run: LoRA (or full) fine-tuning on LLMTIME windows, checked against the FLOP budget, resumable.

`train_run(config)` does, in order: decide where the run starts (fresh, or its checkpoint with --resume), reserve
its remaining FLOPs (training steps + planned validation passes) in the ledger of --runs-dir, or refuse it if they do
not fit the budget (before any data or weights are loaded), build the model and data, then step: forward + backward
on the step's batch, gradient clipping, AdamW, the learning-rate schedule. It logs every step and books it in the
ledger, evaluates (and books the pass) every `eval_every` steps, checkpoints every `checkpoint_every` steps, and at
the end saves the adapter (or all weights) and the loss curve and settles the reservation to what was spent. Under
torchrun each process trains on its slice of every batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
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
from ledger import RECORD_NAME, Ledger, OutsideRunsDir, Recorder, read_record
from qwen_mini import PRESETS
from qwen_mini.fileio import atomic_write, write_json_atomic
from qwen_mini.flops import count_forward, eval_flops, meta_model
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

# Hub ids whose config.json is exactly a preset's: their FLOPs are counted offline, without fetching anything.
HUB_PRESETS = {"Qwen/Qwen2.5-0.5B": "qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B-Instruct": "qwen2.5-0.5b"}


def model_config_of(spec: str) -> QwenConfig:
    """The architecture behind `--model`, read without loading weights (a hub model: only its config.json)."""
    spec = str(spec)
    if spec == "tiny" or spec in PRESETS:
        return QwenConfig.from_name(spec)
    if spec in HUB_PRESETS and not Path(spec).is_dir():
        return QwenConfig.from_name(HUB_PRESETS[spec])
    return QwenConfig.from_hf(resolve_dir(spec, ["config.json"]) / "config.json")


def counting_model(config: TrainConfig) -> nn.Module:
    """The run's model on the meta device, adapters injected: what its FLOPs are counted from."""
    model = meta_model(model_config_of(config.model))
    if not config.full:
        lora.inject(model, config.rank, config.alpha, config.targets, config.lora_dropout)
    return model


def per_step_flops(config: TrainConfig, gqa: str = "real", model: nn.Module | None = None) -> int:
    """Training FLOPs of one step of this run (all processes together), counted on a weightless model with the
    run's adapters. Activation checkpointing runs every decoder block's forward a second time in the backward pass:
    that recomputation is real work and is counted too."""
    report = count_forward(model or counting_model(config), config.batch, config.ctx, gqa=gqa)
    recompute = report.select(lambda row: row.layer.startswith("layers.")) if config.activation_checkpointing else 0
    return report.step + recompute


def eval_pass_flops(config: TrainConfig, gqa: str = "real", model: nn.Module | None = None, world_size: int = 1,
                    n_rows: int | None = None) -> int:
    """FLOPs of one validation pass (forward + loss, no backward) over `n_rows` windows (default: the most it can
    take, --val-batches x --batch), as `validation_loss` runs it: each process takes every world_size-th window, in
    chunks of batch / world_size."""
    model = model or counting_model(config)
    n_rows = config.val_batches * config.batch if n_rows is None else n_rows
    chunk, total = config.batch // world_size, 0
    for rank in range(world_size):
        full, rest = divmod(len(range(rank, n_rows, world_size)), chunk)
        total += full * eval_flops(model, chunk, config.ctx, gqa) if full else 0
        total += eval_flops(model, rest, config.ctx, gqa) if rest else 0
    return total


def evaluation_steps(start: int, steps: int, eval_every: int) -> list[int]:
    """Steps after which a run that starts at `start` validates: step 0 (a fresh run), every eval_every-th, the last."""
    return [s for s in range(start, steps + 1)
            if (s == 0 and start == 0) or (s > start and (s % eval_every == 0 or s == steps))]


@dataclass(frozen=True)
class RunPlan:
    """What a run (from its start point) will compute, counted under one gqa convention."""
    per_step: int
    eval_pass: int  # at most: a pass over --val-batches x --batch windows
    steps: int  # training steps still to do
    evaluations: int  # validation passes still to do

    @property
    def train(self) -> int:
        return self.steps * self.per_step

    @property
    def eval(self) -> int:
        return self.evaluations * self.eval_pass

    @property
    def total(self) -> int:
        return self.train + self.eval


def plan_run(config: TrainConfig, start_step: int = 0, gqa: str = "real", world_size: int = 1) -> RunPlan:
    model = counting_model(config)
    return RunPlan(per_step_flops(config, gqa, model), eval_pass_flops(config, gqa, model, world_size),
                   config.steps - start_step, len(evaluation_steps(start_step, config.steps, config.eval_every)))


@dataclass(frozen=True)
class StartPoint:
    step: int  # steps already done (0 for a fresh run)
    flops_used: int  # training + validation FLOPs the run's ledger record already counts (lost steps included)


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
    flops_used = 0
    if (run_dir / RECORD_NAME).is_file():
        by_kind = read_record(run_dir / RECORD_NAME).by_kind
        flops_used = by_kind["train"] + by_kind["eval"]
    return StartPoint(step, flops_used)


def check_same_trajectory(saved: dict, wanted: dict, where) -> None:
    different = [key for key in TRAJECTORY_KEYS if key in saved and saved[key] != wanted[key]]
    if different:
        details = ", ".join(f"{key}: run has {saved[key]!r}, now {wanted[key]!r}" for key in different)
        raise RunDirError(f"{where}: cannot resume with different settings ({details}); pass the run's own values "
                          "or start a new run in another --out")


def check_inside_runs_dir(config: TrainConfig) -> bool:
    """Whether the run lies inside --runs-dir (and so in its ledger); outside it, refused unless --no-budget."""
    inside = Ledger(config.runs_dir).contains(config.run_dir)
    if not inside and not config.no_budget:
        raise OutsideRunsDir(f"--out {config.run_dir} lies outside --runs-dir {config.runs_dir}, whose FLOP ledger "
                             "would never count this run: put the run under the runs directory, pass the --runs-dir "
                             "that holds it, or pass --no-budget to train without counting it against any budget")
    return inside


@dataclass
class RunStart:
    start: StartPoint
    plan: RunPlan
    gqa: str
    recorder: Recorder  # books the run's FLOPs; holds its reservation unless --no-budget
    counted: bool  # in the ledger of --runs-dir


def prepare_run(config: TrainConfig, world_size: int = 1, holder_lock=None) -> RunStart:
    """Where the run starts and its reservation in the ledger of --runs-dir, for the steps and validation passes it
    still has to do; raises BudgetExceeded (or MixedConventions, OutsideRunsDir) before anything is loaded.

    A resumed run's record keeps what it spent before, and that counts: only its remaining work is reserved, on top
    of everything already committed. `holder_lock`: the lock file this process holds for the run's life (its run
    directory's), which names the reservation's owner; None lets the ledger take one."""
    counted = check_inside_runs_dir(config)
    start = start_point(config)
    ledger = Ledger(config.runs_dir, config.max_flops)
    gqa = ledger.convention(config.gqa) if counted else (config.gqa or "real")
    plan = plan_run(config, start.step, gqa, world_size)
    name = config.run_dir.name
    if config.no_budget:
        recorder = ledger.recorder(config.run_dir, run_name=name, gqa=gqa, config=config.to_dict())
    else:
        recorder = ledger.reserve(config.run_dir, plan.total, kind="train", run_name=name, gqa=gqa,
                                  what=f"train.py {config.run_dir}", holder_lock=holder_lock, config=config.to_dict(),
                                  planned_flops=start.flops_used + plan.total, per_step_flops=plan.per_step)
    return RunStart(start, plan, gqa, recorder, counted)


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
    flops_used: int  # training + validation FLOPs the ledger counts for this run (steps redone after a crash too)
    metrics: list[dict]
    model: nn.Module | None = field(default=None, repr=False)  # the trained model, on rank 0
    tokenizer: object = field(default=None, repr=False)
    counted: bool = True  # in the ledger of its --runs-dir (False: --no-budget outside it)

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
            "per_step_flops": self.per_step_flops, "flops_used": self.flops_used, "counted": self.counted,
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
    recorder = []  # the run's Recorder, on rank 0: it holds a lock, so it does not travel to the other ranks

    def prepare() -> RunStart:
        prepared = prepare_run(config, dist.world_size)
        recorder.append(prepared.recorder)
        return dataclasses.replace(prepared, recorder=None)

    prepared = dist.on_main(prepare)
    try:
        return _train(config, dist, hooks, progress, prepared, recorder[0] if recorder else None)
    finally:
        if recorder:
            recorder[0].settle()  # from now on only what the run spent counts


def _train(config: TrainConfig, dist: Distributed, hooks: Iterable[StepHook], progress: bool, prepared: RunStart,
           recorder: Recorder | None) -> RunResult:
    run_dir, run_name = config.run_dir, config.run_dir.name
    start, per_step = prepared.start, prepared.plan.per_step

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
            "planned_flops": per_step * config.steps, "gqa": prepared.gqa, "counted_in_ledger": prepared.counted,
            "world_size": dist.world_size, "device_used": str(device),
            "torch_version": torch.__version__})
        kept = [m for m in read_metrics(run_dir) if start.step and m["step"] <= start.step]
        atomic_write(run_dir / METRICS_NAME, lambda tmp: Path(tmp).write_text("".join(json.dumps(m) + "\n"
                                                                                     for m in kept)))
    flops_used = start.flops_used
    counter = counting_model(config)
    eval_pass = eval_pass_flops(config, prepared.gqa, counter, dist.world_size, len(run_data.val_rows))

    def log(entry: dict) -> None:
        if dist.is_main:
            with open(run_dir / METRICS_NAME, "a") as f:
                f.write(json.dumps(entry) + "\n")
            if entry["train_loss"] is not None:
                recorder.add("train", per_step, steps=1, step=entry["step"], per_step_flops=per_step)
        for hook in hooks:
            hook(entry["step"], entry)

    def evaluate() -> float:
        nonlocal flops_used
        loss = validation_loss(model, run_data, config.batch // dist.world_size, device, precision, dist)
        flops_used += eval_pass
        if dist.is_main:
            recorder.add("eval", eval_pass, passes=1, windows=len(run_data.val_rows))
        return loss

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
                     model if dist.is_main else None, tokenizer, prepared.counted)
