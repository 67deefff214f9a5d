"""One training run: LoRA (or full) fine-tuning on LLMTIME windows, checked against the FLOP budget, resumable.

`train_run(config)` does, in order: decide where the run starts (fresh, or its checkpoint with --resume), reserve
its remaining FLOPs (training steps + planned validation passes) in the ledger of --runs-dir, or refuse it if they do
not fit the budget (before any data or weights are loaded), build the model and data, then step: forward + backward
on the step's batch, gradient clipping, AdamW, the learning-rate schedule. It logs every step and books it in the
ledger, evaluates (and books the pass) every `eval_every` steps, checkpoints every `checkpoint_every` steps, and at
the end saves the adapter (or all weights) and the loss curve and settles the reservation to what was spent. Under
torchrun each process trains on its slice of every batch.

Before the reservation, settings the model or the data cannot serve are refused (`check_settings`, from config.json
and the data file's header only), then an output directory that cannot be written, and the run directory is locked
for this process's whole life (`claim_run_dir`). A run stops early, keeping its newest checkpoint and a metrics.jsonl
of whole lines, on: a non-finite loss, gradient norm or weight (TrainingDiverged, naming the step; nothing of it is
saved); SIGINT or SIGTERM (Interrupted, after a checkpoint at the end of the step); a failed write, such as on a
full disk (RunDirError naming the file).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as recompute_in_backward
from tqdm import tqdm

from data.lotka_volterra import default_data_path, trajectories_shape
import lora
from qwen_mini import QwenConfig, load_model_and_tokenizer, save_pretrained
from ledger import RECORD_NAME, Ledger, OutsideRunsDir, Recorder, read_record
from qwen_mini import PRESETS
from qwen_mini.fileio import (FileLock, LockHeld, append_line, atomic_write, describe_holder, ensure_writable_dir,
                              os_error_text, sha256_file, write_json_atomic)
from qwen_mini.flops import count_forward, eval_flops, meta_model
from qwen_mini.hub import resolve_dir
from qwen_mini.loading import all_finite
from qwen_mini.loss import causal_lm_loss

from .checkpoint import read_checkpoint, restore_checkpoint, save_checkpoint
from .config import TINY_MODEL_SEED, TRAJECTORY_KEYS, ConfigError, TrainConfig
from .distributed import Distributed
from .plot import plot_losses
from .run import (ADAPTER_DIR, CHECKPOINT_NAME, CONFIG_NAME, LOCK_NAME, METRICS_NAME, MODEL_DIR, PLOT_NAME,
                  RunDirError, read_metrics, read_run_config)
from .stopping import Interrupted, StopSignals, TrainingDiverged
from .windows import RunData, batch_rows, data_position, gather, load_run_data, run_split, target_tokens

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


def check_settings(config: TrainConfig, world_size: int = 1) -> None:
    """Refuse (ConfigError) settings that the model or the data cannot serve, reading only the model's config.json
    and the data file's header: before anything is loaded."""
    if config.batch % world_size:
        raise ConfigError(f"--batch {config.batch} must be divisible by the number of processes ({world_size}): "
                          "each process takes an equal slice of every batch")
    limit = model_config_of(config.model).max_position_embeddings
    if config.ctx > limit:
        raise ConfigError(f"--ctx {config.ctx} is more than the {limit} positions {config.model} supports "
                          "(max_position_embeddings in its config.json)")
    if config.data is not None:
        run_split(config, trajectories_shape(config.data), config.data)


def claim_run_dir(config: TrainConfig) -> RunDirLock:
    """Make sure the run directory can be written and lock it for this process, which holds the lock until the run
    ends: a second process on the same directory is refused at once, naming the holder (pid, host, since). The
    lock dies with its process, so after a crash or kill -9 the next run takes it over (and says so)."""
    run_dir = config.run_dir
    if config.resume:
        check_resumable(run_dir)  # before anything is created in a mistyped directory
    created = topmost_missing(run_dir)
    try:
        ensure_writable_dir(run_dir)
        lock = FileLock(run_dir / LOCK_NAME, what=f"train.py {run_dir}")
    except LockHeld as e:
        raise RunDirError(f"{run_dir} is in use by {describe_holder(e.holder)}: wait for that run to end (or stop "
                          "it), or choose another --out") from None
    except OSError as e:
        raise RunDirError(f"cannot write the run directory: {os_error_text(e)}") from None
    if lock.took_over:
        print(f"train.py: note: {run_dir} was last locked by {describe_holder(lock.previous)}, which ended without "
              "releasing it (a crash or kill -9); taken over", file=sys.stderr)
    for directory in (run_dir, run_dir / ADAPTER_DIR, run_dir / MODEL_DIR):
        for leftover in directory.glob(".*.tmp"):  # half-written by a killed process (atomic_write's temporaries)
            leftover.unlink(missing_ok=True)
    return RunDirLock(lock, created)


def topmost_missing(path: Path) -> Path | None:
    """The highest of `path` and its parents that does not exist: the first directory mkdir(parents=True) makes."""
    missing = None
    for directory in (path, *path.parents):
        if directory.exists():
            break
        missing = directory
    return missing


class RunDirLock:
    """A run directory's lock (see claim_run_dir). Released by a run that never wrote anything there (refused by the
    budget, say), it removes its file and the directories claim_run_dir created: a refused run leaves no trace."""

    def __init__(self, lock: FileLock, created: Path | None):
        self.lock, self.created = lock, created  # created: the topmost directory that did not exist before

    @property
    def path(self) -> Path:
        return self.lock.path

    def release(self) -> None:
        self.lock.release()
        run_dir = self.path.parent
        if self.created is None or os.listdir(run_dir) != [LOCK_NAME]:
            return
        self.path.unlink(missing_ok=True)
        for directory in (run_dir, *run_dir.parents):
            try:
                directory.rmdir()
            except OSError:  # no longer empty: something else lives there now
                return
            if directory == self.created:
                return


def holds_run(run_dir: Path) -> bool:
    return run_dir.is_dir() and any((run_dir / name).exists() for name in RUN_FILES)


def check_resumable(run_dir: Path) -> None:
    if not holds_run(run_dir):
        what = "no such directory" if not run_dir.exists() else f"no run in it (none of {', '.join(RUN_FILES)})"
        raise RunDirError(f"{run_dir}: --resume found {what}; check the path, or leave out --resume to start a new "
                          "run")


def lost_checkpoint_step(saved: dict, metrics: list[dict]) -> int | None:
    """The step of a checkpoint the run must have written, judged from its config.json and metrics, or None. A run
    resumed at step s had one at s; otherwise its first scheduled one (at checkpoint_every, or at the last step)
    was written before the next step was logged."""
    if saved.get("start_step"):
        return saved["start_step"]
    every, steps = saved.get("checkpoint_every") or 0, saved.get("steps")
    first = min(every, steps) if every and steps else (steps or every or None)
    logged = max((row["step"] for row in metrics), default=0)
    return first if first is not None and logged > first else None


def check_same_data(saved: dict, config: TrainConfig, where) -> None:
    """Refuse to resume on a data file whose bytes changed since the run started (its sha256 is in config.json)."""
    path = Path(config.data) if config.data is not None else default_data_path()
    recorded = saved.get("data_sha256")
    if recorded and path.is_file():  # a deleted default set is simulated again, byte for byte the same
        now = sha256_file(path)
        if now != recorded:
            raise RunDirError(f"{where}: the data file {path} changed since the run started (sha256 {recorded[:12]}... "
                              f"then, {now[:12]}... now); resuming needs the data it trained on: put that file "
                              "back, or start a new run with another --out")


@dataclass(frozen=True)
class StartPoint:
    step: int  # steps already done (0 for a fresh run)
    flops_used: int  # training + validation FLOPs the run's ledger record already counts (lost steps included)
    history: tuple = ()  # the metrics lines a resumed run keeps: those up to its checkpoint's step


def start_point(config: TrainConfig) -> StartPoint:
    """Where the run in config.run_dir starts, after checking that the directory fits the request: a fresh run needs
    a directory without a run in it; --resume needs a run there, continues from its checkpoint (or from step 0 if
    the run was stopped before its first one; a checkpoint that went missing is refused) and needs the same
    settings and data file as the run it continues. A torn last line of metrics.jsonl is dropped with a warning."""
    run_dir = config.run_dir
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not config.resume:
        if existing:
            raise RunDirError(f"{run_dir} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
                              "or choose another directory with --out")
        return StartPoint(0, 0)
    check_resumable(run_dir)
    saved = read_run_config(run_dir) if (run_dir / CONFIG_NAME).is_file() else {}
    if saved:
        check_same_trajectory(saved, config.trajectory_values(), run_dir / CONFIG_NAME)
        check_same_data(saved, config, run_dir)
    metrics = read_metrics(run_dir, drop_torn_tail=True)
    state = read_checkpoint(run_dir, mmap=True)
    if state is None:
        lost = lost_checkpoint_step(saved, metrics)
        if lost is not None:
            raise RunDirError(f"{run_dir}: --resume found no {CHECKPOINT_NAME}, but the run wrote one at step {lost} "
                              f"(metrics.jsonl goes to step {max(row['step'] for row in metrics)}): it was deleted or "
                              "moved; starting again at step 0 would overwrite that history. Put the checkpoint back, "
                              "or train again with another --out")
    else:
        check_same_trajectory(state["trajectory"], config.trajectory_values(), run_dir / CHECKPOINT_NAME)
    step = 0 if state is None else int(state["step"])
    if step > config.steps:
        raise RunDirError(f"{run_dir}: the checkpoint is at step {step}, past --steps {config.steps}")
    flops_used = 0
    if (run_dir / RECORD_NAME).is_file():
        by_kind = read_record(run_dir / RECORD_NAME).by_kind
        flops_used = by_kind["train"] + by_kind["eval"]
    return StartPoint(step, flops_used, tuple(row for row in metrics if step and row["step"] <= step))


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


def diverged(run_dir: Path, step: int, what: str, done: Progress) -> TrainingDiverged:
    return TrainingDiverged(f"{run_dir}: non-finite numbers at step {step} ({what}); training stopped there, saving "
                            f"nothing of it, and {done.kept()}. Lower --lr (or --alpha), or clip the gradients "
                            "(--grad-clip)")


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
    check_settings(config, dist.world_size)
    recorder = []  # the run's Recorder, on rank 0: it holds a lock, so it does not travel to the other ranks
    lock = []  # the run directory's lock, held by rank 0 for the whole run (only rank 0 writes there)
    done = Progress()

    def prepare() -> RunStart:
        lock.append(claim_run_dir(config))
        prepared = prepare_run(config, dist.world_size, holder_lock=lock[0].path)
        recorder.append(prepared.recorder)
        return dataclasses.replace(prepared, recorder=None)

    try:
        with StopSignals() as stop:
            prepared = dist.on_main(prepare)
            done.checkpoint = prepared.start.step or None
            return _train(config, dist, hooks, progress, prepared, recorder[0] if recorder else None, stop, done)
    except OSError as e:
        if e.filename is None or not Path(e.filename).resolve().is_relative_to(config.run_dir.resolve()):
            raise  # not one of the run's own files
        where = f"after step {done.logged}" if done.logged is not None else "before its first step"
        raise RunDirError(f"{os_error_text(e)}; the run stopped {where}: {done.kept()}, and metrics.jsonl ends with "
                          "a whole line. Make room (or fix the directory), then continue with --resume") from None
    finally:
        if done.bar is not None:
            done.bar.close()  # before any message: the bar's line ends first
        if recorder:
            recorder[0].settle()  # from now on only what the run spent counts
        if lock:
            lock[0].release()


@dataclass
class Progress:
    """How far a run got: for the message when it stops early."""
    logged: int | None = None  # the last step whose metrics line was written
    checkpoint: int | None = None  # the step of the newest checkpoint on disk
    bar: tqdm | None = None

    def kept(self) -> str:
        if self.checkpoint is None:
            return "it had written no checkpoint yet"
        return f"its newest checkpoint (step {self.checkpoint}) is kept"


def _train(config: TrainConfig, dist: Distributed, hooks: Iterable[StepHook], progress: bool, prepared: RunStart,
           recorder: Recorder | None, stop: StopSignals, done: Progress) -> RunResult:
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
            "torch_version": torch.__version__, "data_sha256": sha256_file(run_data.source),
            "start_step": start.step})
        atomic_write(run_dir / METRICS_NAME, lambda tmp: Path(tmp).write_text("".join(json.dumps(m) + "\n"
                                                                                     for m in start.history)))
    flops_used = start.flops_used
    counter = counting_model(config)
    eval_pass = eval_pass_flops(config, prepared.gqa, counter, dist.world_size, len(run_data.val_rows))

    def log(entry: dict) -> None:
        if dist.is_main:
            append_line(run_dir / METRICS_NAME, json.dumps(entry))
            done.logged = entry["step"]
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

    def checked_evaluation(step: int) -> float:
        loss = evaluate()
        if not math.isfinite(loss):
            raise diverged(run_dir, step, f"validation loss {loss}", done)
        return loss

    def checkpoint(step: int) -> None:
        # Every process checks (they hold the same weights), so all stop alike.
        if not all(all_finite(p.detach()) for p in trainable):
            raise diverged(run_dir, step, "weights holding NaN or infinity after the optimizer step", done)
        if dist.is_main:
            save_checkpoint(run_dir, model=model, optimizer=optimizer, scheduler=scheduler, step=step,
                            data_position=data_position(step, len(run_data.train), config.batch),
                            flops_used=flops_used, trajectory=config.trajectory_values())
        done.checkpoint = step

    if start.step == 0:
        log({"step": 0, "train_loss": None, "val_loss": checked_evaluation(0), "lr": config.lr * lr_factor(0, config),
             "grad_norm": None, "flops": 0, "tokens_per_s": None})
    local = slice(dist.rank * config.batch // dist.world_size, (dist.rank + 1) * config.batch // dist.world_size)
    bar = done.bar = tqdm(total=config.steps, initial=start.step, desc=run_name, unit="step", dynamic_ncols=True,
                          disable=not (progress and dist.is_main))
    last_val = None
    stop.deferring = True  # a signal now ends the run at the end of its step, with a checkpoint
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
        grad_norm = float(nn.utils.clip_grad_norm_(trainable, config.grad_clip if config.grad_clip > 0 else math.inf))
        # One collective for the loss and for a stop request (a signal to any process), so all decide alike.
        stop_request = torch.tensor(float(stop.signum is not None), dtype=torch.float64, device=loss_sum.device)
        reduced = dist.all_reduce_sum(torch.stack([loss_sum.detach().double(), stop_request]))
        loss_total, stop_requests = reduced.tolist()
        train_loss = loss_total / max(tokens, 1)
        flops_used += per_step
        if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
            if dist.is_main:
                recorder.add("train", per_step, steps=1, step=step, per_step_flops=per_step)  # it was computed
            raise diverged(run_dir, step, f"training loss {train_loss}, gradient norm {grad_norm}", done)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - began
        entry = {"step": step, "train_loss": train_loss, "val_loss": None, "lr": lr, "grad_norm": grad_norm,
                 "flops": step * per_step, "tokens_per_s": config.batch * config.ctx / seconds}
        if step % config.eval_every == 0 or step == config.steps:
            entry["val_loss"] = last_val = checked_evaluation(step)
        log(entry)
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.4f}", **({"val": f"{last_val:.4f}"} if last_val is not None else {}),
                        lr=f"{lr:.2e}", tok_s=f"{entry['tokens_per_s']:.0f}")
        stopping = stop_requests > 0 and step < config.steps  # (at the last step, finishing is as quick)
        if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == config.steps or stopping:
            checkpoint(step)
        if stopping:
            raise Interrupted(stop.signum or signal.SIGTERM, checkpoint_step=step)
    bar.close()
    stop.deferring = False

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
