"""`train.py --plan FILE`: the flags a plan may take from the command line, then `run_plan`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from common.args import positive_int
from common.exit_codes import EXIT_DIVERGED, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from data.dataset import TooShort
from forecasting.budget import NothingScored
from forecasting.forecast import GenerationTooLarge
from qwen_mini.generate import NonFiniteLogits

from .identity import check_forecasts_fit, study_for
from .jobs import LAUNCHERS, JobOptions, JobsFailed, preflight, sigterm_raises
from .plan import TRAIN_KEYS, Plan, PlanError, Stage, inherited, load_plan, with_train_settings
from .run import run_plan, winner_line
from .standing import DeadSearch

# The [train] settings a forecast of the base model ("forecast = \"base\"") reads (study.run.run_forecast).
BASE_FORECAST_KEYS = ("model", "data", "decimals")
# With --plan, these flags override the plan's [study] and every run's device and dtype; the flags of [train] settings
# (--seed among them) override its [train], under each stage's own settings.
PLAN_FLAGS = ("plan", "runs_dir", "max_flops", "change_max_flops", "gqa", "device", "dtype")
# How a plan's runs are dispatched (study.jobs): flags only --plan takes.
JOB_FLAGS = ("jobs", "gpus", "launcher", "slurm_partition", "slurm_time", "slurm_gpus_per_job", "slurm_account",
             "slurm_array_parallelism")


def gpu_list(text: str) -> tuple[str, ...]:
    """argparse type: '0,1,2,3' -> ('0', '1', '2', '3')."""
    gpus = tuple(g.strip() for g in text.split(",") if g.strip())
    if not gpus or not all(g.isdigit() for g in gpus) or len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(f"give distinct GPU numbers separated by commas, such as 0,1,2,3; "
                                         f"got {text!r}")
    return gpus


def add_job_arguments(parser: argparse.ArgumentParser) -> tuple[str, ...]:
    """train.py's flags for running a plan's runs as parallel jobs (only with --plan); returns their dests."""
    g = parser.add_argument_group(
        "parallel runs of a plan (--plan only)",
        "the runs of each stage as jobs of their own; the driver waits for a stage's jobs before the next stage, and "
        "the same command continues a stopped or preempted study (see docs/studies.md, Parallel runs)")
    g.add_argument("--jobs", type=positive_int, default=None, metavar="N",
                   help="run up to N runs of a stage at once, each a process of its own (default: 1, in this process; "
                        "with --gpus, one per GPU); on CPU each gets max(1, cores // N) torch threads")
    g.add_argument("--gpus", type=gpu_list, default=None, metavar="LIST",
                   help="GPUs for the jobs, such as 0,1,2,3: each job gets one (CUDA_VISIBLE_DEVICES), round-robin, "
                        "at most one job per GPU at a time")
    g.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local: processes on this machine; slurm: one SLURM job per run, submitted through submitit "
                        "(pip install submitit); submitit-local: submitit's LocalExecutor on this machine, for testing "
                        "(default: %(default)s)")
    g.add_argument("--slurm-partition", default=None, help="--launcher slurm: the partition")
    g.add_argument("--slurm-time", type=positive_int, default=60, metavar="MINUTES",
                   help="--launcher slurm: each job's time limit (also submitit-local's timeout) "
                        "(default: %(default)s)")
    g.add_argument("--slurm-gpus-per-job", type=positive_int, default=None, metavar="N",
                   help="--launcher slurm: GPUs of each job (default: none requested)")
    g.add_argument("--slurm-account", default=None, help="--launcher slurm: the account charged")
    g.add_argument("--slurm-array-parallelism", type=positive_int, default=None, metavar="N",
                   help="--launcher slurm: the most jobs of a stage's array running at once (default: --jobs, else "
                        "submitit's 256)")
    return JOB_FLAGS


def job_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> JobOptions:
    slurm_only = [f for f in ("slurm_partition", "slurm_gpus_per_job", "slurm_account", "slurm_array_parallelism")
                  if getattr(args, f, None) is not None]
    if slurm_only and args.launcher != "slurm":
        parser.error(f"--{slurm_only[0].replace('_', '-')} needs --launcher slurm")
    if args.gpus and args.launcher != "local":
        parser.error("--gpus is for --launcher local; SLURM gives each job its GPUs (--slurm-gpus-per-job)")
    if args.gpus and not torch.cuda.is_available():  # else each job would train on the CPU, silently
        parser.error(f"--gpus {','.join(args.gpus)}: no CUDA device is available to this torch {torch.__version__}; "
                     "leave out --gpus (--jobs N runs jobs on the CPU)")
    jobs = args.jobs if args.jobs is not None else (len(args.gpus) if args.gpus else 1)
    parallelism = args.slurm_array_parallelism if args.slurm_array_parallelism is not None else args.jobs
    return JobOptions(jobs=jobs, gpus=tuple(args.gpus or ()), launcher=args.launcher,
                      slurm_partition=args.slurm_partition, slurm_time=args.slurm_time,
                      slurm_gpus_per_job=args.slurm_gpus_per_job, slurm_account=args.slurm_account,
                      slurm_array_parallelism=parallelism)


def set_by_stage(plan: Plan, stage: Stage, key: str) -> bool:
    """Whether a training stage's runs take `key` from the stage itself (a setting, a grid, a search's range or
    choices, steps sized by the cap) or from the best run of the stage it starts from, which took it so: then not
    from [train]."""
    search = stage.search
    if key in stage.settings or key in stage.grid or (key == "steps" and stage.size is not None) \
            or (search is not None and (key in search.ranges or key in search.choices)):
        return True
    if stage.source is None:
        return False
    marker = object()  # does the stage start from its source's value of `key` (study.plan.inherited's rule)?
    if inherited(plan, SimpleNamespace(settings={key: marker})).get(key) is not marker:
        return False
    return set_by_stage(plan, plan.stage(stage.source), key)


def refuse_unused_settings(plan: Plan, settings: dict, flags: dict | None = None) -> None:
    """Refuse (PlanError) a command-line [train] setting that no run of the plan takes (`train.py --plan P --lr 0.5`
    where every stage sets lr): it would change nothing, yet count as another identity, a study of its own that
    trains the same runs again. `flags`: each setting's flag (default --<key>)."""
    training = [s for s in plan.stages if s.kind == "train"]
    forecasts_base = any(s.kind == "forecast" and s.source == "base" for s in plan.stages)
    for key, value in settings.items():
        if any(not set_by_stage(plan, s, key) for s in training) or (forecasts_base and key in BASE_FORECAST_KEYS):
            continue
        what = (f"every training stage ({', '.join(s.name for s in training)}) sets its own {key} or takes it from "
                "the stage it starts from") if training else "it has no training stage"
        flag = (flags or {}).get(key, f"--{key.replace('_', '-')}")
        raise PlanError(f"{flag} {_flag_text(value)}: no run of {plan.path} would take it: "
                        f"{what}; leave the flag out, or change the plan")


def _flag_text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def plan_spelling(plan: Plan, settings: dict) -> dict:
    """`settings` with a --data or --model that names the plan's own [train] data file or model directory by another
    spelling (a relative path for the plan's absolute one) spelled as the plan spells it: the plan's own value, not
    another identity (a study of its own that trains the same runs again), and its runs' records keep one path."""
    spelled = dict(settings)
    for key in ("data", "model"):
        given, planned = settings.get(key), plan.train.get(key)
        if isinstance(given, str) and isinstance(planned, str) and given != planned \
                and Path(given).exists() and Path(given).resolve() == Path(planned).resolve():
            spelled[key] = planned
    return spelled


def plan_command(args: argparse.Namespace, parser: argparse.ArgumentParser, dist, typed: set[str]) -> int:
    """Run the study plan `args.plan` (train.py's parser and process group); 0 when every stage is done. `typed`:
    the flags the command line gave (common.args.typed_dests): each wins over the plan, whatever its value."""
    if dist.enabled:
        parser.error("--plan runs its stages one after another in one process: start it without torchrun")
    changed = {dest: value for dest, value in vars(args).items()
               if dest in typed and dest not in PLAN_FLAGS + JOB_FLAGS}
    overrides = {"dtype": args.dtype} if "dtype" in typed else {}  # also every run's [train] dtype: the identity's
    for dest, value in changed.items():
        flag = "--" + dest.replace("_", "-")
        if dest not in TRAIN_KEYS:
            parser.error(f"{flag}: not a setting of a plan's [train]; with --plan give [train] settings or "
                         f"{', '.join('--' + f.replace('_', '-') for f in PLAN_FLAGS[1:])}")
        if isinstance(value, list):  # --lr / --rank / --ctx take lists; a plan's grid lives in its stages
            if len(value) != 1:
                parser.error(f"{flag}: with --plan give one value (it replaces the plan's [train] {dest}); a grid "
                             "belongs in a [[stage]]")
            value = value[0]
        overrides[dest] = value

    def given(dest):
        return getattr(args, dest) if dest in typed else None

    jobs = job_options(args, parser) if hasattr(args, "jobs") else None
    try:
        plan = load_plan(args.plan, runs_dir=given("runs_dir"), max_flops=given("max_flops"), gqa=args.gqa,
                         change_max_flops=args.change_max_flops)
        flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
        refuse_unused_settings(plan, {k: v for k, v in overrides.items() if k in changed}, flags)
        plan = with_train_settings(plan, plan_spelling(plan, overrides))
        check_forecasts_fit(plan)
        if jobs is not None:
            preflight(jobs)  # a launcher that cannot start a job, before any stage spends a FLOP
        plan = study_for(plan)
        with sigterm_raises():  # between runs and in a forecast stage too: one line and 143, its locks released
            study = run_plan(plan, device=given("device"), dtype=given("dtype"), jobs=jobs)
    except DeadSearch as e:  # every configuration of a search's rung diverged: what they spent stays booked
        print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except (PlanError, TooShort, GenerationTooLarge) as e:  # TooShort: data too short for a forecast, found while
        print(f"train.py: error: {e}", file=sys.stderr)        # counting its FLOPs; a forecast that cannot fit
        return EXIT_USAGE
    except (NothingScored, NonFiniteLogits) as e:  # a forecast stage that scored nothing (its FLOPs stay booked)
        print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except JobsFailed as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return e.exit_status
    print(f"\n[plan] study {plan.name} done: {plan.study_dir}/")
    for stage in study["stages"]:
        if stage["kind"] == "train":  # the winner's score on the criterion that chose it, not another loss
            print(f"[plan]   {winner_line(stage).removeprefix('[plan] ')}; {len(stage['runs'])} run(s), the "
                  f"best in {stage['best']}")
        else:
            print(f"[plan]   {stage['name']}: forecasts in {', '.join(stage['forecasts'])}")
    print(f"[plan] next: python report.py {plan.runs_dir} ; python flops.py --runs {plan.runs_dir}")
    return EXIT_OK
