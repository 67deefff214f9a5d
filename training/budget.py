"""A run's FLOPs before anything is loaded: what each step and validation pass costs, what the run will compute from
its resume point (`plan_run_flops`), and its reservation of that in the ledger of --runs-dir (`prepare_run`).

Everything is counted on a weightless model (`counting_model`, on the meta device) with the run's adapters, under
the ledger's gqa convention, so a run that does not fit the budget is refused before any data or weights load.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

import lora
from ledger import RECORD_NAME, Ledger, OutsideRunsDir, Recorder, record_present
from ledger.records import count, utc_now
from qwen_mini.config import config_for_model
from qwen_mini.flops import count_forward, eval_flops

from .checkpoint import read_checkpoint
from .config import TrainConfig
from .run import CHECKPOINT_NAME, METRICS_NAME, read_metrics
from .rundir import ResumePoint, resume_point


def counting_model(config: TrainConfig) -> nn.Module:
    """The run's model on the meta device, adapters injected: what its FLOPs are counted from."""
    return lora.lora_model_on_meta(config_for_model(config.model), 0 if config.full else config.rank, config.alpha,
                                   config.targets, config.lora_dropout)


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


def evaluation_count(start: int, steps: int, eval_every: int) -> int:
    """How many times a run that starts at `start` validates on its way to `steps`: at step 0 (a fresh run), after
    every eval_every-th step and after the last. Counted, not listed: a run of a billion steps is one line."""
    if steps <= start:
        return 0
    last = 1 if steps % eval_every else 0  # the last step, unless it is an eval_every-th one anyway
    return (1 if start == 0 else 0) + steps // eval_every - start // eval_every + last


@dataclass(frozen=True)
class RunFlopPlan:
    """What a run (from its resume point) will compute, counted under one gqa convention."""
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


def plan_run_flops(config: TrainConfig, start_step: int = 0, gqa: str = "real", world_size: int = 1,
                   model: nn.Module | None = None) -> RunFlopPlan:
    """The FLOPs of the steps and validation passes a run starting at `start_step` still has to do; `model`: its
    counting_model, if already built."""
    model = model or counting_model(config)
    return RunFlopPlan(per_step_flops(config, gqa, model), eval_pass_flops(config, gqa, model, world_size),
                       config.steps - start_step, evaluation_count(start_step, config.steps, config.eval_every))


def steps_within(flops: int, plan: RunFlopPlan, start: int, eval_every: Callable[[int], int]) -> int:
    """The most steps a run that starts at `start` can reach when its remaining steps and validation passes
    (`evaluation_count`, at `eval_every(steps)`) must fit `flops`; `plan` gives its per-step and per-pass FLOPs.
    `start` when not one more step fits. (Binary search; whatever it returns fits, even where a shorter run validates
    more often, as with eval_every = steps // 10 below 20 steps.)"""
    def cost(steps: int) -> int:
        return (steps - start) * plan.per_step + evaluation_count(start, steps, eval_every(steps)) * plan.eval_pass

    low, high = start, start + max(flops, 0) // plan.per_step  # the steps alone of any more would not fit
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if cost(middle) <= flops else (low, middle - 1)
    return low


def check_inside_runs_dir(config: TrainConfig) -> bool:
    """Whether the run lies inside --runs-dir (and so in its ledger); outside it, refused unless --no-budget."""
    inside = Ledger(config.runs_dir).contains(config.run_dir)
    if not inside and not config.no_budget:
        raise OutsideRunsDir(f"--out {config.run_dir} lies outside --runs-dir {config.runs_dir}, whose FLOP ledger "
                             "would never count this run: put the run under the runs directory, pass the --runs-dir "
                             "that holds it, or pass --no-budget to train without counting it against any budget")
    return inside


def proven_spending(run_dir: Path, per_step: int, eval_pass: int) -> tuple[dict[str, int], int, int, str]:
    """What a run directory proves its run spent, from its checkpoint (the FLOPs it counted up to its step) and the
    metrics.jsonl lines past it (a step each, a validation pass each): (by_kind, steps, passes, the proof)."""
    state = read_checkpoint(run_dir, mmap=True)
    saved_step = int(state["step"]) if state is not None else 0
    train = (saved_step - int(state.get("continued_from_step", 0) if state is not None else 0)) * per_step
    spent_eval = max(count("checkpoint flops_used", state["flops_used"]) - train, 0) if state is not None else 0
    later = [row for row in read_metrics(run_dir, drop_torn_tail=True) if state is None or row["step"] > saved_step]
    steps = sum(row.get("train_loss") is not None for row in later)
    passes = sum(row.get("val_loss") is not None for row in later)
    proof = (f"{CHECKPOINT_NAME} (step {saved_step}) and " if state is not None else "") + \
        f"{METRICS_NAME} ({steps} step(s), {passes} validation pass(es) after it)"
    flops = {"train": train + steps * per_step, "eval": spent_eval + passes * eval_pass}
    return flops, saved_step + steps, passes, proof


def rebuild_lost_record(config: TrainConfig, ledger: Ledger, start: ResumePoint, plan: RunFlopPlan, gqa: str
                        ) -> ResumePoint:
    """A resumed run whose flops.json is gone: its record is written again from what the run proves it spent
    (`proven_spending`), so the ledger never counts less than the run did; the resume point carries that spending."""
    by_kind, steps, passes, proof = proven_spending(config.run_dir, plan.per_step, plan.eval_pass)
    if not by_kind["train"] + by_kind["eval"]:
        return start
    ledger.rebuild(config.run_dir, run_name=config.run_dir.name, gqa=gqa, by_kind=by_kind, step=steps,
                   per_step=plan.per_step, evaluations=passes, proof=proof)
    print(f"train.py: note: {config.run_dir / RECORD_NAME} was missing; rebuilt from {proof}: "
          f"{by_kind['train'] + by_kind['eval']:.4g} FLOPs spent", file=sys.stderr)
    return dataclasses.replace(start, flops_used=by_kind["train"] + by_kind["eval"])


@dataclass
class PreparedRun:
    """A run that may start: where it starts, what it will compute, and its booking in the ledger."""
    resume_point: ResumePoint
    flop_plan: RunFlopPlan
    gqa: str
    recorder: Recorder | None  # books the run's FLOPs; holds its reservation unless --no-budget (only on rank 0)
    counted: bool  # in the ledger of --runs-dir
    counting_model: nn.Module | None = None  # the weightless model flop_plan was counted on (only on rank 0)


def prepare_run(config: TrainConfig, world_size: int = 1, holder_lock=None) -> PreparedRun:
    """Where the run starts and its reservation in the ledger of --runs-dir, for the steps and validation passes it
    still has to do; raises BudgetExceeded (or MixedConventions, OutsideRunsDir) before anything is loaded.

    A resumed run's record keeps what it spent before, and that counts: only its remaining work is reserved, on top
    of everything already committed. `holder_lock`: the lock file this process holds for the run's life (its run
    directory's), which names the reservation's owner; None lets the ledger take one."""
    counted = check_inside_runs_dir(config)
    start = resume_point(config)
    ledger = Ledger(config.runs_dir, config.max_flops, change_max_flops=config.change_max_flops)
    gqa = ledger.convention(config.gqa) if counted else (config.gqa or "real")
    model = counting_model(config)
    plan = plan_run_flops(config, start.step, gqa, world_size, model)
    name = config.run_dir.name
    if config.resume and not record_present(config.run_dir / RECORD_NAME):
        start = rebuild_lost_record(config, ledger, start, plan, gqa)
    if config.no_budget:
        recorder = ledger.recorder(config.run_dir, run_name=name, gqa=gqa, config=config.to_dict(), started=utc_now())
    else:
        recorder = ledger.reserve(config.run_dir, plan.total, kind="train", run_name=name, gqa=gqa,
                                  what=f"train.py {config.run_dir}", holder_lock=holder_lock, config=config.to_dict(),
                                  planned_flops=start.flops_used + plan.total, per_step_flops=plan.per_step,
                                  started=utc_now())
    return PreparedRun(start, plan, gqa, recorder, counted, model)
