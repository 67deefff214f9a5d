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

This module is the run's phases (`Trainer`: setup, one step, evaluate, save a checkpoint, finish); the FLOP plan and
reservation are in `budget`, the run directory's lock and resume checks in `rundir`, what the model, precision,
loss and optimizer are built from in `setup`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import lora
from common.fileio import append_line, atomic_write, os_error_text, sha256_file, write_json_atomic
from common.progress import progress_bar
from qwen_mini import save_pretrained
from qwen_mini.config import TINY_MODEL_SEED
from qwen_mini.loading import all_finite

from .budget import PreparedRun, counting_model, eval_pass_flops, prepare_run
from .checkpoint import read_checkpoint, restore_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .distributed import Distributed
from .plot import plot_losses
from .run import (
    ADAPTER_DIR,
    CHECKPOINT_NAME,
    CONFIG_NAME,
    METRICS_NAME,
    MODEL_DIR,
    PLOT_NAME,
    RunDirError,
    RunResult,
    read_metrics,
)
from .rundir import check_same_trajectory, claim_run_dir
from .setup import (
    build_optimizer,
    build_training_model,
    check_settings,
    lr_factor,
    optimizer_step,
    overflow_skipped,
    resolve_device,
    resolve_precision,
    summed_token_loss,
)
from .stopping import Interrupted, StopSignals, TrainingDiverged
from .tensorboard import NoBoard, open_board, summary_writer_class
from .validation import validation_losses
from .windows import batch_rows, count_loss_tokens, data_position, gather, load_run_data

StepHook = Callable[[int, dict], None]


def train_run(config: TrainConfig, *, dist: Distributed | None = None, hooks: Iterable[StepHook] = (),
              progress: bool = True) -> RunResult:
    """Train one run to config.steps (from its checkpoint with config.resume) and return what it did.

    `hooks` are called as hook(step, metrics_entry) after every logged step, on every process; `progress`: show a
    progress bar (on rank 0)."""
    dist = dist or Distributed()
    check_settings(config, dist.world_size)
    if config.tensorboard:
        summary_writer_class()  # a missing package is one line, before any FLOP is reserved
        check_tensorboard_dir(config)
    lock = []  # the run directory's lock, held by rank 0 for the whole run (only rank 0 writes there)
    # Rank 0's PreparedRun, whole: its recorder holds a lock and its counting model is not worth sending, so neither
    # travels to the other ranks.
    prepared_on_main = []
    finished = []
    run_progress = Progress()

    def prepare() -> PreparedRun:
        lock.append(claim_run_dir(config))
        prepared_on_main.append(prepare_run(config, dist.world_size, holder_lock=lock[0].path))
        return dataclasses.replace(prepared_on_main[0], recorder=None, counting_model=None)

    try:
        with StopSignals() as stop:
            shared = dist.on_main(prepare)
            prepared = prepared_on_main[0] if prepared_on_main else shared
            run_progress.checkpoint = prepared.resume_point.step or None
            trainer = Trainer(config, dist, prepared, run_progress, stop, hooks, show_bar=progress)
            result = trainer.run()
            finished.append(True)  # every step done: the record's `finished` time
            if trainer.asked_to_stop:  # during the last step, its validation or the saving: the run is whole, and
                # the command stops here (a grid's or a plan's next run does not start), as the signal asked
                raise Interrupted(stop.signum or signal.SIGTERM, checkpoint_step=config.steps, run_finished=True)
            return result
    except Interrupted as e:
        e.run_dir = e.run_dir or config.run_dir  # for the message: did this run write a checkpoint before?
        raise
    except OSError as e:
        if e.filename is None or not Path(e.filename).resolve().is_relative_to(config.run_dir.resolve()):
            raise  # not one of the run's own files
        where = f"after step {run_progress.logged}" if run_progress.logged is not None else "before its first step"
        raise RunDirError(f"{os_error_text(e)}; the run stopped {where}: {run_progress.kept()}, and metrics.jsonl ends "
                          "with a whole line. Make room (or fix the directory), then continue with --resume") from None
    finally:
        if run_progress.bar is not None:
            run_progress.bar.close()  # before any message: the bar's line ends first
        if prepared_on_main and not (config.run_dir / CONFIG_NAME).exists():
            prepared_on_main[0].recorder.discard()  # failed before config.json (a model or data that did not load)
        elif prepared_on_main:
            prepared_on_main[0].recorder.settle(bool(finished))  # from now on only what the run spent counts
        if lock:
            lock[0].release()


def check_tensorboard_dir(config: TrainConfig) -> None:
    """Refuse (ConfigError) event files that could not be written — a file stands where their directory would be, or
    the nearest existing directory on the way takes no files (a read-only filesystem, no permission) — before the run
    directory is made, not after config.json (which would leave a run that a plain rerun must not overwrite)."""
    flag = "--tensorboard-dir " if config.tensorboard_dir is not None else ""
    directory = next(d for d in (config.tensorboard_path, *config.tensorboard_path.parents) if d.exists())
    if not directory.is_dir():
        raise ConfigError(f"{flag}{directory}: exists and is not a directory, so the TensorBoard event files "
                          f"cannot go to {config.tensorboard_path}")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".tensorboard-probe-"):
            pass  # a file can be made there (and is gone again)
    except OSError as e:
        raise ConfigError(f"{flag}{config.tensorboard_path}: the TensorBoard event files cannot be written there "
                          f"({os_error_text(e)}); give a --tensorboard-dir that can be written") from None


@dataclass
class Progress:
    """How far a run got: for the message when it stops early."""
    logged: int | None = None  # the last step whose metrics line was written
    checkpoint: int | None = None  # the step of the newest checkpoint on disk
    bar: object | None = None  # common.progress.progress_bar's bar

    def kept(self) -> str:
        if self.checkpoint is None:
            return "it had written no checkpoint yet"
        return f"its newest checkpoint (step {self.checkpoint}) is kept"


def diverged(run_dir: Path, step: int, what: str, run_progress: Progress) -> TrainingDiverged:
    return TrainingDiverged(f"{run_dir}: non-finite numbers at step {step} ({what}); training stopped there, saving "
                            f"nothing of it, and {run_progress.kept()}. Lower --lr (or --alpha), or clip the gradients "
                            "(--grad-clip)")


class Trainer:
    """One prepared run, phase by phase (the shape of a torchtune recipe): `setup` builds the model, data and
    optimizer (restored from the checkpoint when resuming), `write_run_files` starts config.json and metrics.jsonl,
    `train` runs `train_step` for every step, `evaluate` and `save_checkpoint` when due, and `finish` saves the
    adapter (or weights) and the loss curve. Every process runs it; only rank 0 writes files and books FLOPs."""

    def __init__(self, config: TrainConfig, dist: Distributed, prepared: PreparedRun, run_progress: Progress,
                 stop: StopSignals, hooks: Iterable[StepHook] = (), show_bar: bool = True):
        self.config, self.dist, self.prepared = config, dist, prepared
        self.run_progress, self.stop, self.hooks, self.show_bar = run_progress, stop, hooks, show_bar
        self.run_dir, self.recorder = config.run_dir, prepared.recorder  # the recorder: on rank 0 only
        self.per_step = prepared.flop_plan.per_step
        self.flops_used = prepared.resume_point.flops_used
        # --continue-from: the step of the run this one continues (its steps up to there are that run's FLOPs).
        self.continued_from_step = prepared.resume_point.step if prepared.resume_point.source else 0
        self.board = NoBoard()  # --tensorboard's event files (rank 0), fed each metrics.jsonl line
        self.asked_to_stop = False  # a signal came after the last step's stop check: the run finished, then stops

    def run(self) -> RunResult:
        self.setup()
        self.write_run_files()
        start = self.prepared.resume_point.step
        if self.dist.is_main:  # from the first step this process logs on: 0, or the checkpoint's step + 1
            self.board = open_board(self.config, start + 1 if start else 0, self.per_step)
        try:
            if start == 0:
                self.log({"step": 0, "train_loss": None, **self.evaluate(0),
                          "lr": self.config.lr * lr_factor(0, self.config), "grad_norm": None, "flops": 0,
                          "tokens_per_s": None})
            self.train()
            result = self.finish()
            self.asked_to_stop = self.stop_requested()
            return result
        finally:
            self.stop.deferring = False
            self.board.close()

    def setup(self) -> None:
        config, dist = self.config, self.dist
        self.device = resolve_device(config.device, dist)
        self.precision = resolve_precision(config, self.device)
        self.model, self.tokenizer = build_training_model(config, self.device, self.precision)
        self.run_data = load_run_data(config, self.tokenizer)
        self.trainable = lora.trainable_parameters(self.model)
        self.optimizer, self.scheduler = build_optimizer(config, self.trainable)
        self.scaler, self.skipped_steps = self.precision.grad_scaler(self.device), 0  # float16's loss scaling
        if self.prepared.resume_point.step:
            self.resume_from_checkpoint()
        self.loss_module = summed_token_loss(self.model, dist, self.device)
        model = self.prepared.counting_model or counting_model(config)  # rank 0 counts on the plan's model
        self.eval_pass = eval_pass_flops(config, self.prepared.gqa, model, dist.world_size, len(self.run_data.val_rows))
        # This process's slice of every global batch.
        self.local = slice(dist.rank * config.batch // dist.world_size,
                           (dist.rank + 1) * config.batch // dist.world_size)

    def resume_from_checkpoint(self) -> None:
        source = self.prepared.resume_point.source  # --continue-from (checked by rundir.continuation_point)
        state = read_checkpoint(source or self.run_dir)
        if source is None:
            check_same_trajectory(state["trajectory"], self.config.trajectory_values(), self.run_dir / CHECKPOINT_NAME)
            self.continued_from_step = int(state.get("continued_from_step", 0))
        if state["data_position"]["n_windows"] != len(self.run_data.train):
            raise RunDirError(f"{self.run_dir}: the checkpoint was trained on {state['data_position']['n_windows']} "
                              f"windows, the data now gives {len(self.run_data.train)}: the data file changed")
        restore_checkpoint(state, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                           scaler=self.scaler)
        self.skipped_steps = state.get("skipped_steps", 0)

    def write_run_files(self) -> None:
        """metrics.jsonl (the lines a resumed or continued run keeps), a continued run's state as its own checkpoint
        (so its source is never needed again; before config.json, which says that it was written), and config.json
        (every setting, the data, the model, the FLOP plan), on rank 0."""
        if not self.dist.is_main:
            return
        config, model, per_step, start = self.config, self.model, self.per_step, self.prepared.resume_point
        atomic_write(self.run_dir / METRICS_NAME, lambda tmp: Path(tmp).write_text(
            "".join(json.dumps(m) + "\n" for m in start.history)))
        if start.source is not None:
            self.save_checkpoint(start.step)
        write_json_atomic(self.run_dir / CONFIG_NAME, {
            "run_name": self.run_dir.name, **config.to_dict(), **self.run_data.describe(),
            "model_seed": TINY_MODEL_SEED if config.model == "tiny" else None,
            # A local --model as an absolute path, so load_run finds it from any working directory.
            "model_dir": str(Path(config.model).resolve()) if Path(config.model).is_dir() else None,
            "model_config": model.config.to_hf(), "trainable_params": sum(p.numel() for p in self.trainable),
            "total_params": sum(p.numel() for p in model.parameters()), "per_step_flops": per_step,
            "planned_flops": per_step * (config.steps - self.continued_from_step), "gqa": self.prepared.gqa,
            "counted_in_ledger": self.prepared.counted, "world_size": self.dist.world_size,
            "device_used": str(self.device), "torch_version": torch.__version__,
            "data_sha256": sha256_file(self.run_data.source), "start_step": start.step,
            "continued_from_step": self.continued_from_step or None})

    def train(self) -> None:
        """Every step from the resume point to config.steps, validating and checkpointing when due; a stop request
        (a signal to any process) ends the run after the step, with a checkpoint. One that comes at the last step (or
        later, while the run saves its weights) lets the run finish: `run` then sets `asked_to_stop`."""
        config = self.config
        bar = self.run_progress.bar = progress_bar(total=config.steps, initial=self.prepared.resume_point.step,
                                                   desc=self.run_dir.name, unit="step",
                                                   disable=not (self.show_bar and self.dist.is_main))
        last_val = None
        self.stop.deferring = True  # a signal now ends the run at the end of its step, with a checkpoint
        for step in range(self.prepared.resume_point.step + 1, config.steps + 1):
            entry, stop_requested = self.train_step(step)
            if step % config.eval_every == 0 or step == config.steps:
                entry.update(self.evaluate(step))
                last_val = entry["val_loss"]
                stop_requested = stop_requested or self.stop_requested()  # a signal during the validation pass
            self.log(entry)
            bar.update(1)
            bar.set_postfix(loss=f"{entry['train_loss']:.4f}",
                            **({"val": f"{last_val:.4f}"} if last_val is not None else {}),
                            lr=f"{entry['lr']:.2e}", tok_s=f"{entry['tokens_per_s']:.0f}")
            stopping = stop_requested and step < config.steps  # (at the last step, finishing is as quick)
            if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == config.steps or stopping:
                self.save_checkpoint(step)
            if stopping:
                raise Interrupted(self.stop.signum or signal.SIGTERM, checkpoint_step=step)
        bar.close()

    def stop_requested(self) -> bool:
        """Whether any process was asked to stop (one collective, so that every process decides alike)."""
        asked = self.stop.signum is not None
        if not self.dist.enabled:
            return asked
        return bool(self.dist.all_reduce_sum(torch.tensor([float(asked)], device=self.device)).item() > 0)

    def train_step(self, step: int) -> tuple[dict, bool]:
        """Forward and backward on this process's slice of step `step`'s batch, gradient clipping, AdamW and the
        schedule. Returns the step's metrics line (val_loss still None) and whether any process was asked to stop."""
        config, dist, run_data = self.config, self.dist, self.run_data
        began = time.perf_counter()
        rows = batch_rows(step - 1, len(run_data.train), config.batch, config.seed)
        tokens = count_loss_tokens(run_data.train.labels[rows])  # of the global batch, which every process knows
        input_ids, labels = gather(run_data.train, rows[self.local], self.device)
        lr = self.optimizer.param_groups[0]["lr"]
        with self.precision.autocast(self.device):
            loss_sum = self.loss_module(input_ids, labels)
        # DDP averages the processes' gradients; scaling each process's summed loss by world_size / (the global
        # batch's tokens) makes that average the gradient of the mean loss over every token of the global batch,
        # exactly what a single process computes.
        # float16: backward through the loss times the dynamic scale, then the true gradients for clipping.
        self.scaler.scale(loss_sum * dist.world_size / max(tokens, 1)).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(nn.utils.clip_grad_norm_(self.trainable,
                                                   config.grad_clip if config.grad_clip > 0 else math.inf))
        # One collective for the loss and for a stop request (a signal to any process), so all decide alike.
        stop_request = torch.tensor(float(self.stop.signum is not None), dtype=torch.float64, device=loss_sum.device)
        reduced = dist.all_reduce_sum(torch.stack([loss_sum.detach().double(), stop_request]))
        loss_total, stop_requests = reduced.tolist()
        train_loss = loss_total / max(tokens, 1)
        self.flops_used += self.per_step
        skipped = overflow_skipped(self.scaler, train_loss, grad_norm)  # float16: skipped and counted, not stopped
        if not skipped and not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
            if dist.is_main:  # it was computed
                self.recorder.add("train", self.per_step, steps=1, step=step, per_step_flops=self.per_step)
            raise diverged(self.run_dir, step, f"training loss {train_loss}, gradient norm {grad_norm}",
                           self.run_progress)
        optimizer_step(self.scaler, self.optimizer, self.scheduler)
        self.skipped_steps += skipped
        seconds = time.perf_counter() - began
        entry = {"step": step, "train_loss": train_loss, "val_loss": None, "lr": lr,
                 "grad_norm": None if skipped else grad_norm,
                 "flops": step * self.per_step, "tokens_per_s": config.batch * config.ctx / seconds,
                 "skipped": skipped, "skipped_steps": self.skipped_steps}
        return entry, stop_requests > 0

    def evaluate(self, step: int) -> dict:
        """The validation loss after step `step` (and over each window's last N targets: `val_loss_last`), booked
        in the ledger; a non-finite one stops the run."""
        loss, last = validation_losses(self.model, self.run_data, self.config.batch // self.dist.world_size,
                                       self.device, self.precision, self.dist, self.config.ctx)
        self.flops_used += self.eval_pass
        if self.dist.is_main:
            self.recorder.add("eval", self.eval_pass, passes=1, windows=len(self.run_data.val_rows))
        if not math.isfinite(loss):
            raise diverged(self.run_dir, step, f"validation loss {loss}", self.run_progress)
        return {"val_loss": loss, "val_loss_last": last}

    def log(self, entry: dict) -> None:
        """Append the step's metrics line and book the step (rank 0), then call the hooks (every process)."""
        if self.dist.is_main:
            append_line(self.run_dir / METRICS_NAME, json.dumps(entry))
            self.board.log(entry)  # the same dict: TensorBoard cannot disagree with metrics.jsonl
            self.run_progress.logged = entry["step"]
            if entry["train_loss"] is not None:
                self.recorder.add("train", self.per_step, steps=1, step=entry["step"], per_step_flops=self.per_step)
        for hook in self.hooks:
            hook(entry["step"], entry)

    def save_checkpoint(self, step: int) -> None:
        # Every process checks (they hold the same weights), so all stop alike.
        if not all(all_finite(p.detach()) for p in self.trainable):
            raise diverged(self.run_dir, step, "weights holding NaN or infinity after the optimizer step",
                           self.run_progress)
        if self.dist.is_main:
            save_checkpoint(self.run_dir, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                            step=step, data_position=data_position(step, len(self.run_data.train), self.config.batch),
                            flops_used=self.flops_used, trajectory=self.config.trajectory_values(),
                            scaler=self.scaler, skipped_steps=self.skipped_steps,
                            continued_from_step=self.continued_from_step)
        self.run_progress.checkpoint = step

    def finish(self) -> RunResult:
        """Save the adapter (or every weight and the tokenizer) and the loss curve on rank 0, then wait for all."""
        config, run_dir, metrics = self.config, self.run_dir, []
        if self.dist.is_main:
            if config.full:
                save_pretrained(self.model, run_dir / MODEL_DIR)
                self.tokenizer.save_pretrained(run_dir / MODEL_DIR)
            else:
                lora.save_adapter(self.model, run_dir / ADAPTER_DIR, base_model_name_or_path=config.model)
            metrics = read_metrics(run_dir)
            plot_losses(metrics, run_dir / PLOT_NAME, title=run_dir.name)
        self.dist.barrier()
        return RunResult(run_dir, config, config.steps, self.per_step, self.flops_used, metrics,
                         self.model if self.dist.is_main else None, self.tokenizer, self.prepared.counted,
                         self.prepared.gqa)
