"""The train.py command line: flags -> TrainConfig(s) -> train_run / run_grid -> summary table (or, with --plan, the
plan runner that train.py hands in: training does not import the study package above it)."""
from __future__ import annotations

import argparse
import sys

from common.args import non_negative_float, non_negative_int, positive_float, positive_int, seed_int, typed_dests
from common.exit_codes import EXIT_DIVERGED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_OVER_BUDGET, EXIT_USAGE
from common.fileio import os_error_text
from data.llmtime import SCALER_CHOICES
from data.lotka_volterra import SPLIT_MODES, DataError
from ledger import BudgetExceeded, LedgerError, MixedConventions, OutsideRunsDir
from ledger.flags import CHANGE_MAX_FLOPS_HELP, MAX_FLOPS_HELP, add_budget_arguments
from lora import check_targets
from qwen_mini import CheckpointError, CheckpointNotFound
from qwen_mini import ConfigError as ModelConfigError

from .config import DEFAULT_DECAY, DEFAULT_MODEL, DTYPES, FIT_STEPS, SCHEDULES, ConfigError, TrainConfig
from .distributed import from_environment, shutdown
from .grid import SUMMARY_NAME, expand_grid, format_summary, grid_dir, run_grid
from .loop import train_run
from .run import CHECKPOINT_NAME, RunDirError
from .stopping import Interrupted, TrainingDiverged

DESCRIPTION = """\
Fine-tune Qwen2.5 with LoRA (or every weight, --full) on Lotka-Volterra series in LLMTIME text, under a FLOP budget.

  python train.py --rank 8 --ctx 768                      LoRA on Qwen/Qwen2.5-0.5B-Instruct, simulated data
  python train.py --lr 1e-5 5e-5 --rank 4 8               a grid: one run per combination, then a summary table
  python train.py --model tiny --full --steps 300         offline demo: the tiny random model, all weights
  python train.py <same flags> --resume                   continue a stopped run from its last checkpoint
  python train.py --plan plans/coursework.toml            a whole study, stage by stage (re-run it to continue)
  torchrun --nproc_per_node 2 train.py ...                data parallel (NCCL on GPU, gloo on CPU)

Each run directory gets config.json, metrics.jsonl, loss_curve.png, flops.json (its entry in the budget ledger,
see `python flops.py --runs runs`), checkpoint.pt, and adapter/ (PEFT format) or model/ (--full)."""

EPILOG = """\
Before a run (or a whole grid) starts, it reserves its planned FLOPs (training steps + validation passes, counted by
qwen_mini.flops) in the ledger of --runs-dir, under a file lock; they must fit --max-flops together with every FLOP
spent or reserved there (training, validation, forecasts), otherwise nothing is loaded or trained. At the end the
reservation is settled to what was spent; a killed run's is taken over by --resume or released by
`flops.py --runs DIR --settle`. A run outside --runs-dir is refused unless --no-budget, and so is a --runs-dir
inside another runs directory's ledger (use that one). A run that fails before its first file (a model or data that
will not load) leaves no ledger record; a resumed run whose flops.json is gone gets it rebuilt from its checkpoint
and metrics.jsonl.
Each run directory is locked by the process training it: a second train.py on it is refused, naming that process.
Ctrl-C (SIGINT) and SIGTERM (schedulers, `timeout`) stop a run at the end of its current step, with a checkpoint
there; a second signal stops it at once. One that comes during a run's last step (or its final validation) lets
that run finish, then stops the command all the same (130 or 143): a grid's or a plan's next run does not start.
A non-finite loss, gradient norm or weight stops it at that step, saving nothing of it. Either way the run keeps its
newest checkpoint: the same command with --resume continues it.
Exit status: 0 done, 1 the run failed (data, model, checkpoint, a run directory in use or not writable, a failed
write such as a full disk), 2 bad arguments (settings the model or the data cannot serve, a run outside --runs-dir,
an lr above 1e6, a --plan flag that no run of the plan takes included), 3 refused by the FLOP budget or by the
ledger's gqa convention, 4 training diverged (non-finite numbers), 130 stopped by Ctrl-C, 143 stopped by SIGTERM."""


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(model=DEFAULT_MODEL)
    p = argparse.ArgumentParser(prog="train.py", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    what = p.add_argument_group("model and data")
    what.add_argument("--model", default=d.model,
                      help="hub id or local directory with config.json, *.safetensors and tokenizer.json; 'tiny' = "
                           "the tiny preset with random weights and a character tokenizer, for offline runs "
                           "(default: %(default)s)")
    what.add_argument("--data", default=None, metavar="H5",
                      help="Lotka-Volterra h5 file (/trajectories (N, T, 2), /time); default: the built-in "
                           "simulated set (1000 trajectories, generated once and cached)")
    what.add_argument("--decimals", type=non_negative_int, default=d.decimals,
                      help="decimals of the LLMTIME numbers (default: %(default)s)")
    what.add_argument("--scaler", default=d.scaler,
                      help=f"the LLMTIME scaling rule, fitted on each trajectory's first {FIT_STEPS} steps (the "
                           f"forecast context): {SCALER_CHOICES}; joint-p95x10 is seeds 000/004's, p99x10 seed 002's, "
                           "fixed=0.5 with --decimals 3 seed 003's (default: %(default)s)")
    what.add_argument("--split", dest="split_mode", choices=SPLIT_MODES, default=d.split_mode,
                      help="the 70/15/15 train/val/test split of the trajectories: ordered = in file order, the last "
                           "15 %% test and the 15 %% before them validation; random = a seeded permutation "
                           "(default: %(default)s)")
    what.add_argument("--split-seed", type=seed_int, default=d.split_seed,
                      help="seed of the random split (--split random) (default: %(default)s)")

    adapt = p.add_argument_group("what is trained")
    adapt.add_argument("--full", action="store_true", help="train every weight instead of LoRA adapters")
    adapt.add_argument("--rank", type=positive_int, nargs="+", default=[d.rank], metavar="R",
                       help="LoRA rank; several values make a grid (default: %(default)s)")
    adapt.add_argument("--alpha", type=float, default=None,
                       help="LoRA alpha, scaling = alpha / rank (default: the rank, i.e. scaling 1)")
    adapt.add_argument("--targets", type=target_list, default=d.targets, metavar="LIST",
                       help=f"comma-separated projections that get adapters (default: {','.join(d.targets)})")
    adapt.add_argument("--lora-dropout", type=non_negative_float, default=d.lora_dropout,
                       help="dropout on the adapters' input (default: %(default)s)")

    optim = p.add_argument_group("optimisation")
    optim.add_argument("--lr", type=positive_float, nargs="+", default=[d.lr], metavar="LR",
                       help="AdamW learning rate; several values make a grid (default: %(default)s)")
    optim.add_argument("--batch", type=positive_int, default=d.batch,
                       help="windows per step, over all processes (default: %(default)s)")
    optim.add_argument("--ctx", type=positive_int, nargs="+", default=[d.ctx], metavar="TOKENS",
                       help="tokens per window; several values make a grid (default: %(default)s)")
    optim.add_argument("--stride", type=positive_int, default=None,
                       help="tokens between the starts of consecutive windows (default: ctx // 2)")
    optim.add_argument("--steps", type=positive_int, default=d.steps, help="optimizer steps (default: %(default)s)")
    optim.add_argument("--warmup", type=non_negative_int, default=d.warmup,
                       help="steps of linear learning-rate warmup (default: %(default)s)")
    optim.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                       help="after warmup: constant; cosine decay to 0 at --steps; or wsd (warmup-stable-decay): "
                            "constant, then a 1 - sqrt decay to 0 over the last --decay of the steps "
                            "(default: %(default)s)")
    optim.add_argument("--decay", type=positive_float, default=None,
                       help=f"--schedule wsd: the share of the steps its decay takes, at most 1 (default: "
                            f"{DEFAULT_DECAY})")
    optim.add_argument("--grad-clip", type=non_negative_float, default=d.grad_clip,
                       help="clip the gradient norm to this value; 0 = no clipping (default: %(default)s)")
    optim.add_argument("--weight-decay", type=non_negative_float, default=d.weight_decay,
                       help="AdamW weight decay (default: %(default)s)")
    optim.add_argument("--seed", type=seed_int, default=d.seed,
                       help="seed of the adapters' initialisation, the batch order and dropout (default: %(default)s)")

    evaluation = p.add_argument_group("evaluation, checkpoints, output")
    evaluation.add_argument("--eval-every", type=positive_int, default=None,
                            help="steps between validation losses (default: steps // 10); also at step 0 and the end")
    evaluation.add_argument("--val-batches", type=positive_int, default=d.val_batches,
                            help="batches of validation windows, a fixed subset spread over the val split "
                                 "(default: %(default)s)")
    evaluation.add_argument("--checkpoint-every", type=non_negative_int, default=d.checkpoint_every,
                            help="steps between checkpoints; 0 = only at the end (default: %(default)s)")
    evaluation.add_argument("--out", default=None, metavar="DIR",
                            help="the run directory (default: RUNS_DIR/<model>_<r RANK|full>_lr<LR>_ctx<CTX>); for a "
                                 "grid, the directory holding its runs and summary.json (default: RUNS_DIR/grid_...)")
    add_budget_arguments(evaluation, runs_dir="where runs live: the FLOP ledger sums every flops.json under it "
                                               "(default: %(default)s)", runs_dir_default=d.runs_dir)
    evaluation.add_argument("--tensorboard", action="store_true",
                            help="also write TensorBoard event files of every metrics.jsonl line (losses, lr, grad "
                                 "norm, tokens/s, FLOPs; the losses also against the FLOPs, in by_flops/) to "
                                 "RUN_DIR/tensorboard; view with `tensorboard --logdir RUNS_DIR` (needs the "
                                 "tensorboard package)")
    evaluation.add_argument("--tensorboard-dir", default=None, metavar="DIR",
                            help="with --tensorboard: the event files' directory instead (for a grid, one "
                                 "subdirectory per run)")
    evaluation.add_argument("--resume", action="store_true",
                            help="continue the run(s) in their directories from the last checkpoint, with the same "
                                 "settings (--steps may grow)")
    evaluation.add_argument("--continue-from", default=None, metavar="RUN_DIR",
                            help="start a new run from RUN_DIR's checkpoint (its weights, optimizer, data position "
                                 "and step k) and train only steps k+1..--steps, as if trained straight: RUN_DIR must "
                                 "have this run's settings apart from --steps, --schedule and --decay, and steps 1..k "
                                 "must lie in the constant part of both schedules (e.g. a constant run continued "
                                 "under wsd). RUN_DIR is only read; this run's FLOPs are only its own steps")
    add_budget_arguments(
        evaluation, max_flops=MAX_FLOPS_HELP, max_flops_default=d.max_flops, change_max_flops=CHANGE_MAX_FLOPS_HELP,
        gqa="how the ledger counts attention: real grouped-query k/v, or mha (the coursework's multi-head "
            "simplification); one convention per runs directory (default: the runs directory's, real for a new one)",
        no_budget="no reservation and no budget check; needed for a --out outside --runs-dir, which then is counted "
                  "in no ledger")
    evaluation.add_argument("--plan", metavar="TOML",
                            help="run a study plan stage by stage (grid, best-of sweep, final run, forecasts); "
                                 "continues a stopped study. Settings come from the plan; a flag typed wins, "
                                 "whatever its value: --runs-dir, --max-flops, --gqa over its [study], --device and "
                                 "--dtype over every run, the flags of [train] settings (--data, --model, --seed, "
                                 "--batch, one --lr / --rank / --ctx, ...) over its [train] (a stage's own settings "
                                 "still apply over them; see plans/; one that no run of the plan would take is "
                                 "refused). Run again with other settings or data, the plan is a study of its own "
                                 "beside the first (STUDY-<key>), as the output says")

    hardware = p.add_argument_group("hardware")
    hardware.add_argument("--device", default=d.device,
                          help="auto (CUDA if available), cpu, cuda, cuda:1 ... (default: %(default)s)")
    hardware.add_argument("--dtype", choices=DTYPES, default=d.dtype,
                          help="float32; bfloat16: autocast and (LoRA) a bf16 base model; float16: fp16 autocast "
                               "over float32 weights with dynamic loss scaling (overflow steps are skipped and "
                               "counted in metrics.jsonl); auto = bfloat16 on CUDA GPUs that have it, float16 on "
                               "older ones, float32 on CPU and mps (no bfloat16 on mps) (default: %(default)s)")
    hardware.add_argument("--activation-checkpointing", action="store_true",
                          help="recompute each block's activations in the backward pass: less memory for long "
                               "contexts, about a third more compute (counted in the FLOPs)")
    hardware.add_argument("--compile", action="store_true",
                          help="torch.compile the decoder blocks (forward and backward; the loss stays eager): the "
                               "same math, compiled once per process (tens of seconds on CPU)")
    return p


def target_list(text: str) -> tuple[str, ...]:
    """argparse type: 'q_proj,v_proj' -> ('q_proj', 'v_proj'), each a projection LoRA can wrap."""
    return check_targets([t.strip() for t in text.split(",") if t.strip()], error=argparse.ArgumentTypeError)


def configs_from_args(args: argparse.Namespace, plan_only=()) -> list:
    """The TrainConfig of every run the flags ask for (`plan_only`: dests of flags that only --plan takes)."""
    settings = {key: value for key, value in vars(args).items()
                if key not in ("lr", "rank", "ctx", "plan", *plan_only)}
    return expand_grid(settings, args.lr, args.rank, args.ctx)


def interruption(e: KeyboardInterrupt, configs: list[TrainConfig] = ()) -> str:
    """What a stop left behind, for its one line. `configs`: the runs of this command (none with --plan; then the run
    the stop interrupted, if it says)."""
    if not isinstance(e, Interrupted):
        return "interrupted"
    if e.run_finished:
        where = f" of {e.run_dir}" if e.run_dir is not None else ""
        return (f"stopped by {e.name} at the last step ({e.checkpoint_step}){where}, which finished with its weights "
                "saved")
    if e.checkpoint_step is None:
        run_dirs = [c.run_dir for c in configs] or ([e.run_dir] if e.run_dir is not None else [])
        if run_dirs and not any((d / CHECKPOINT_NAME).is_file() for d in run_dirs):
            return f"stopped by {e.name} before the first checkpoint (none was written)"  # loading, simulating data
        return f"stopped by {e.name} (the newest checkpoint is the one written before)"
    return f"stopped by {e.name} after step {e.checkpoint_step}, with a checkpoint there"


def failure_status(e: BaseException, who: str, again: str | None, configs: list[TrainConfig] = ()) -> int | None:
    """The one line (to stderr, prefixed `who`) and the exit status of a training that failed with `e`, the way every
    train.py process reports it (a study's jobs too); None for a failure that is a bug (its traceback is due).
    `again`: the command that continues a stopped training (None: nothing is left to continue)."""
    if isinstance(e, (BudgetExceeded, MixedConventions)):
        what = "budget" if isinstance(e, BudgetExceeded) else "ledger"
        print(f"{who}: refused by the FLOP {what}: {e}", file=sys.stderr)
        return EXIT_OVER_BUDGET
    if isinstance(e, KeyboardInterrupt):
        advice = f"to continue, run {again}" if again is not None else "nothing is left to continue"
        print(f"{who}: {interruption(e, configs)}; {advice}", file=sys.stderr)
        return e.exit_status if isinstance(e, Interrupted) else EXIT_INTERRUPTED
    statuses = ((TrainingDiverged, EXIT_DIVERGED), ((OutsideRunsDir, ConfigError), EXIT_USAGE),
                ((RunDirError, DataError, CheckpointError, CheckpointNotFound, ModelConfigError, LedgerError,
                  OSError), EXIT_FAILED))
    for kinds, status in statuses:
        if isinstance(e, kinds):
            print(f"{who}: error: {os_error_text(e) if isinstance(e, OSError) else e}", file=sys.stderr)
            return status
    return None


def main(argv: list[str] | None = None, run_plan=None, plan_arguments=None, again: str | None = None) -> int:
    """train.py. `run_plan(args, parser, dist, typed)`: what --plan runs (train.py passes the study package's runner;
    its failures end like a run's), `typed` the dests of the flags the command line gave (a value equal to the
    default included). `plan_arguments(parser)`: adds the flags only --plan takes, returning their dests. `again`:
    the command that continues a stopped training, for its line (default: this command, with --resume where it
    needs one; demo.py passes its own)."""
    parser = build_parser()
    plan_only = tuple(plan_arguments(parser)) if plan_arguments is not None else ()
    args = parser.parse_args(argv)
    if args.plan is not None and run_plan is None:
        parser.error("--plan is run by train.py (the study package), not by training.cli alone")
    typed = typed_dests(parser, argv)
    given = [dest for dest in plan_only if dest in typed]
    if args.plan is None and given:
        parser.error(f"--{given[0].replace('_', '-')} dispatches the runs of a study plan: it needs --plan")
    if args.change_max_flops and args.max_flops is None:
        parser.error("--change-max-flops makes --max-flops the runs directory's cap: give --max-flops too")
    if args.plan is None and args.tensorboard_dir is not None and not args.tensorboard:
        parser.error("--tensorboard-dir says where --tensorboard writes: it needs --tensorboard")
    try:
        configs = [] if args.plan is not None else configs_from_args(args, plan_only)
    except ConfigError as e:
        parser.error(str(e))
    dist = from_environment(args.device)
    try:
        if args.plan is not None:
            return run_plan(args, parser, dist, typed)
        if len(configs) == 1:
            results = [train_run(configs[0], dist=dist)]
        else:
            results = run_grid(configs, dist=dist)
    except BaseException as e:
        continued_by = again or "the same command" + ("" if args.plan is not None else " with --resume")
        if again is None and isinstance(e, Interrupted) and e.run_finished and configs \
                and e.run_dir == configs[-1].run_dir:
            continued_by = None  # the last run (of a grid) finished: this command has nothing left to continue
        status = failure_status(e, "train.py", continued_by, configs)
        if status is None:
            raise
        return status
    finally:
        shutdown()
    if dist.is_main:
        print(format_summary([result.summary_row() for result in results]))
        for result in results:
            print(f"run directory: {result.run_dir}")
            if not result.counted:
                print(f"note: {result.run_dir} was not counted in any FLOP ledger (--no-budget outside --runs-dir "
                      f"{result.config.runs_dir}); its FLOPs are in its own flops.json")
        if len(configs) > 1:
            print(f"summary: {grid_dir(configs) / SUMMARY_NAME}")
    return EXIT_OK
