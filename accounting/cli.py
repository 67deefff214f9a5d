"""flops.py's three views: one training step's FLOPs per layer, counted from the model's own modules on the meta
device (`main` without --runs or --plan); the FLOP ledger of a runs directory, with --settle and whether a planned
run fits (`show_ledger`); a study plan's FLOPs stage by stage (`show_plan`). It sits above study, training, lora
and the ledger, because the plan view needs `study.estimate`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.args import non_negative_int, positive_int
from common.exit_codes import EXIT_OK, EXIT_OVER_BUDGET, EXIT_USAGE
from common.fileio import os_error_text
from ledger import DEFAULT_BUDGET, BudgetExceeded, Ledger, LedgerError, MixedConventions, format_ledger, summary
from ledger.flags import CHANGE_MAX_FLOPS_HELP, add_budget_arguments
from lora import VALID_TARGETS, lora_model_on_meta, trainable_parameters
from qwen_mini import PRESETS, ConfigError, QwenConfig
from qwen_mini.config import HUB_PRESETS, config_for_model
from qwen_mini.flop_report import FlopCountError, format_flops, log10
from qwen_mini.flops import COSTS, count_forward
from study.estimate import estimate_plan, format_estimate
from study.identity import study_for
from study.plan import PlanError, load_plan
from study.run import check_study_dir
from training.cli import target_list
from training.config import TrainConfig

# Defaults of train.py (TrainConfig's): the setting the users quote; the model is its architecture's preset.
DEFAULT_MODEL = "qwen2.5-0.5b"
DEFAULT_BATCH, DEFAULT_CTX, DEFAULT_RANK = TrainConfig.batch, TrainConfig.ctx, TrainConfig.rank
DEFAULT_TARGETS = TrainConfig.targets


class UsageError(Exception):
    """A flag value this tool cannot use (reported as a usage error, exit status 2)."""


def cost_override(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or name not in COSTS:
        raise argparse.ArgumentTypeError(f"expected PRIMITIVE=FLOPS with PRIMITIVE one of {', '.join(COSTS)}, "
                                         f"got {text!r}")
    try:
        return name, non_negative_int(value)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flops.py",
        description="FLOPs of one training step of Qwen2.5 + LoRA, per layer, counted from the model's modules "
                    "(backward = 2 x forward). With --runs: the FLOP ledger of a runs directory (training, "
                    "validation and forecasting FLOPs of every run). With --plan: a study plan's FLOPs, stage by "
                    "stage.",
        epilog="Counting conventions (primitive costs, matmul = m*p*(2n-1), softmax, RoPE tables, loss, KV-cache "
               "generation): see the docstring of qwen_mini/flops.py. A runs directory has one cap, recorded in its "
               "ledger.json by the first job that gives one: --runs DIR shows it, --runs DIR --max-flops N "
               "--change-max-flops changes it. Exit status: 0 ok, 2 bad arguments (a plan that train.py --plan "
               "would refuse, such as a study directory holding another version of the plan, included), 3 over "
               "budget: the ledger of --runs has spent more than its cap, or a planned run (--steps) or plan "
               "(--plan) does not fit what is left, or --max-flops differs from the runs directory's cap without "
               "--change-max-flops.")
    model = parser.add_argument_group("model")
    which = model.add_mutually_exclusive_group()
    which.add_argument("--model", default=None, metavar="NAME",
                       help=f"model preset: {', '.join(PRESETS)} (default {DEFAULT_MODEL}); a local directory "
                            "holding config.json also works")
    which.add_argument("--config", type=Path, metavar="PATH",
                       help="Hugging Face config.json of a Qwen2/Qwen2.5 model, or a directory containing one")
    setting = parser.add_argument_group("training setting (defaults: train.py's)")
    setting.add_argument("--batch", type=positive_int, default=DEFAULT_BATCH,
                         help=f"sequences per step (default {DEFAULT_BATCH})")
    setting.add_argument("--ctx", type=positive_int, default=DEFAULT_CTX,
                         help=f"tokens per sequence (default {DEFAULT_CTX})")
    setting.add_argument("--rank", type=non_negative_int, default=DEFAULT_RANK,
                         help=f"LoRA rank; 0 = no adapters, i.e. full fine-tuning, whose backward is still counted "
                              f"as 2 x forward (default {DEFAULT_RANK})")
    setting.add_argument("--alpha", type=float, default=None,
                         help="LoRA alpha (scaling = alpha/rank; default: the rank, lora's default). Does not change "
                              "the count: the scaling multiply is counted whatever its value")
    setting.add_argument("--dropout", type=float, default=0.0,
                         help="LoRA dropout probability; > 0 adds 2 FLOPs per adapter input element (default 0)")
    setting.add_argument("--targets", type=target_list, default=DEFAULT_TARGETS, metavar="LIST",
                         help=f"comma-separated projections that get adapters, from: {', '.join(VALID_TARGETS)} "
                              f"(default {','.join(DEFAULT_TARGETS)})")
    setting.add_argument("--steps", type=positive_int, default=None,
                         help="training steps of a planned run: prints the run's total FLOPs (and with --runs, "
                              "whether it fits the remaining budget)")
    setting.add_argument("--seed", type=int, default=None,
                         help="accepted like the other tools' --seed; counting is deterministic and ignores it")
    counting = parser.add_argument_group("counting")
    add_budget_arguments(counting, gqa="real: k/v projections to the model's key/value heads; mha: the common "
                                       "simplification that counts grouped-query attention as multi-head attention "
                                       "(default: real, or with --runs/--plan the ledger's convention)")
    counting.add_argument("--cost", type=cost_override, action="append", default=[], metavar="PRIMITIVE=FLOPS",
                          help=f"override one primitive's cost, e.g. --cost exp=1 (repeatable); defaults: "
                               f"{', '.join(f'{k}={v}' for k, v in COSTS.items())}")
    counting.add_argument("--by", choices=("layer", "component"), default="layer",
                          help="table rows: one per layer (default) or one per operation summed over the layers")
    budget = parser.add_argument_group("budget ledger")
    budget.add_argument("--runs", type=Path, metavar="DIR",
                        help="runs directory: print every record's FLOPs by kind (train, eval, forecast; from its "
                             "flops.json), reservations of running jobs, the totals and what is left of the budget")
    budget.add_argument("--settle", action="store_true",
                        help="with --runs: release the reservations of jobs whose process is gone (what they spent "
                             "stays booked)")
    budget.add_argument("--drop-untrusted", action="store_true",
                        help="with --settle: also drop the reservations whose lock cannot be trusted (a path that is "
                             "not a *.lock file beside its record, or not a plain file: a hand-edited, corrupted or "
                             "moved record, which --settle alone refuses, naming it); the lock is never opened, what "
                             "the reservation spent stays booked")
    budget.add_argument("--plan", type=Path, metavar="TOML",
                        help="a study plan (see plans/): each stage's training, evaluation and forecasting FLOPs, what "
                             "is already spent of it, and whether the rest fits the budget left in the plan's runs "
                             "directory (or --runs)")
    add_budget_arguments(budget, max_flops="the budget of everything under the runs directory together (default: the "
                                           "runs directory's recorded cap, or the plan's, else 1e17); another than "
                                           "the recorded cap is refused without --change-max-flops",
                         change_max_flops="with --runs and --max-flops: record --max-flops as the runs directory's "
                                          "cap, replacing the one recorded (refused below what is already spent or "
                                          "reserved); with --plan: count the plan against it. " + CHANGE_MAX_FLOPS_HELP)
    parser.add_argument("--json", action="store_true", help="print JSON (exact integer counts) instead of tables")
    return parser


def load_config(args) -> QwenConfig:
    if args.config is not None:
        return QwenConfig.from_hf(args.config)
    name = args.model or DEFAULT_MODEL
    if name in PRESETS or name in HUB_PRESETS:
        return config_for_model(name)
    if Path(name).exists():
        return QwenConfig.from_hf(name)
    raise UsageError(f"--model {name!r} is neither a preset ({', '.join(PRESETS)}), a known hub id "
                     f"({', '.join(HUB_PRESETS)}) nor a local directory with config.json; for a downloaded checkpoint "
                     "pass its config with --config")


def build_model(config: QwenConfig, args):
    """The model on the meta device, with adapters injected as train.py does. Returns (model, lora description)."""
    alpha = args.rank if args.alpha is None else args.alpha
    model = lora_model_on_meta(config, args.rank, alpha, args.targets, args.dropout)
    trainable = sum(p.numel() for p in trainable_parameters(model))
    if args.rank == 0:
        return model, {"rank": 0, "trainable_parameters": trainable}
    return model, {"rank": args.rank, "alpha": alpha, "targets": list(args.targets), "dropout": args.dropout,
                   "trainable_parameters": trainable}


def describe(config: QwenConfig, adapters: dict) -> str:
    model = (f"model {config.name}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
             f"{config.num_attention_heads} query / {config.num_key_value_heads} key-value heads of "
             f"{config.head_dim}, MLP {config.intermediate_size}, vocab {config.vocab_size:,}")
    if adapters["rank"] == 0:
        return f"{model}\nno LoRA (full fine-tuning: {adapters['trainable_parameters']:,} trainable parameters)"
    return (f"{model}\nLoRA rank {adapters['rank']} (alpha {adapters['alpha']:g}, dropout {adapters['dropout']:g}) "
            f"on {', '.join(adapters['targets'])}: {adapters['trainable_parameters']:,} trainable parameters")


def show_ledger(args, report, released: list) -> int:
    """flops.py --runs DIR [--settle] [--max-flops N [--change-max-flops]] [--steps N]: the ledger against the runs
    directory's cap (and where that cap was recorded), and whether a planned run fits. `released`: what --settle
    released (`Ledger.settle_dead`, before anything else read the records)."""
    ledger = Ledger(args.runs, args.max_flops, change_max_flops=args.change_max_flops)
    cap = ledger.cap()  # CapConflict: another --max-flops than the recorded cap, without --change-max-flops
    changed = ledger.set_cap("flops.py --change-max-flops") if args.change_max_flops else None
    records = ledger.records()
    output = {**summary(records, cap, args.runs), "cap": ledger.cap_source(), "settled": [
        {"run_name": record.run_name, "reservation": r["id"], "flops": r["flops"], "spent": r["spent"],
         "what": r.get("what", ""), "untrusted_lock": bool(r.get("untrusted"))} for record, r in released]}
    status = EXIT_OVER_BUDGET if output["over_budget"] else EXIT_OK
    refusal = None
    if args.steps:
        planned = args.steps * report.step
        output["planned_run"] = {"steps": args.steps, "per_step_flops": report.step, "flops": planned,
                                 "log10_flops": log10(planned)}
        try:
            output["planned_run"].update(fits=True, remaining_after=ledger.check(planned, records, report.step))
        except BudgetExceeded as e:
            refusal, status = str(e), EXIT_OVER_BUDGET
            output["planned_run"].update(fits=False, refused=refusal)
    if args.json:
        print(json.dumps(output, indent=2))
        return status
    if changed is not None:
        print(f"cap: {format_flops(changed.max_flops)} FLOPs is now the cap of {args.runs} ({changed.describe()})")
    for record, r in released:
        why = f"its lock {r['lock']!r} is not a lock file beside {record.path}" if r.get("untrusted") else \
            f"pid {r.get('pid', '?')}, gone"
        print(f"settled: {record.run_name}: released {format_flops(max(r['flops'] - r['spent'], 0))} FLOPs reserved "
              f"by {r.get('what') or 'a job'} ({why}); its {format_flops(r['spent'])} spent stay")
    if args.settle and not released:
        print("settled: no reservation of a finished process was left")
    print(f"FLOP ledger of {args.runs} (gqa={', '.join(output['gqa']) or '-'}):")
    print(format_ledger(records, cap, args.runs, cap_source=output["cap"]))
    if args.steps:
        print(f"\nplanned run: {args.steps:,} steps x {format_flops(report.step)} = {format_flops(planned)} FLOPs "
              f"(log10 {log10(planned):.2f}; batch {args.batch} x ctx {args.ctx}, gqa={report.gqa}; training only)")
        if refusal:
            print(f"REFUSED: {refusal}", file=sys.stderr)
        else:
            print(f"fits: {format_flops(output['planned_run']['remaining_after'])} FLOPs of the budget left after it")
    if output["over_budget"]:
        print(f"OVER BUDGET: {format_flops(output['total'])} FLOPs spent > budget {format_flops(cap)}",
              file=sys.stderr)
    return status


def show_plan(args) -> int:
    """flops.py --plan FILE: the plan's stages, their FLOPs, and whether what is left of it fits."""
    try:
        plan = load_plan(args.plan, runs_dir=args.runs, max_flops=args.max_flops, gqa=args.gqa,
                         change_max_flops=args.change_max_flops)
        Ledger(plan.runs_dir, plan.max_flops, change_max_flops=plan.change_max_flops).cap()  # the cap agrees
        # The study train.py --plan would run: its own directory, or a study of its own beside it when the data's
        # bytes changed since (said on stderr with --json, so that stdout stays JSON).
        plan = study_for(plan, log=lambda line: print(line, file=sys.stderr if args.json else sys.stdout))
        check_study_dir(plan)  # a directory train.py would refuse (another version of the plan) is refused here too
        estimate = estimate_plan(plan)
    except MixedConventions as e:  # CapConflict: the plan's cap is not the runs directory's
        print(f"flops.py: refused by the FLOP ledger: {e}", file=sys.stderr)
        return EXIT_OVER_BUDGET
    except (PlanError, LedgerError, ValueError, OSError) as e:
        print(f"flops.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(estimate.to_dict(), indent=2) if args.json else format_estimate(plan, estimate))
    return EXIT_OK if estimate.fits else EXIT_OVER_BUDGET


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.settle and args.runs is None:
        parser.error("--settle needs --runs DIR")
    if args.drop_untrusted and not args.settle:
        parser.error("--drop-untrusted needs --settle (it drops reservations as --settle releases them)")
    if args.change_max_flops and (args.max_flops is None or (args.runs is None and args.plan is None)):
        parser.error("--change-max-flops needs --max-flops N and --runs DIR (or --plan): the cap it records")
    if args.plan is not None:
        return show_plan(args)
    try:
        config = load_config(args)
        config.check_positions(args.ctx)
        model, adapters = build_model(config, args)
        if args.runs is not None and not args.runs.is_dir():
            what = "not a directory" if args.runs.exists() else "no such directory"
            raise UsageError(f"--runs {args.runs}: {what}")
        # first: --drop-untrusted mends what every other reading refuses
        released = Ledger(args.runs).settle_dead(args.drop_untrusted) if args.settle else []
        gqa = Ledger(args.runs).convention(args.gqa) if args.runs is not None else (args.gqa or "real")
        report = count_forward(model, args.batch, args.ctx, gqa=gqa, costs=dict(args.cost))
        if args.runs is not None:
            return show_ledger(args, report, released)
    except (UsageError, ConfigError, FlopCountError, LedgerError, ValueError) as e:
        print(f"flops.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # e.g. --settle in a runs directory that cannot be written
        print(f"flops.py: error: {os_error_text(e)}", file=sys.stderr)
        return EXIT_USAGE
    except (MixedConventions, BudgetExceeded) as e:  # gqa or cap conflicts; a cap changed below what is spent
        print(f"flops.py: refused by the FLOP ledger: {e}", file=sys.stderr)
        return EXIT_OVER_BUDGET

    max_flops = args.max_flops or DEFAULT_BUDGET
    settings = {"model": config.name, "batch": args.batch, "ctx": args.ctx, "gqa": gqa, "lora": adapters,
                "steps": args.steps, "max_flops": max_flops}
    output: dict = {"settings": settings, "per_step_flops": report.step, "report": report.to_dict()}
    planned = args.steps * report.step if args.steps else None
    if planned is not None:
        output["planned_run"] = {"steps": args.steps, "flops": planned, "log10_flops": log10(planned)}
    if args.json:
        print(json.dumps(output, indent=2))
        return EXIT_OK
    print(describe(config, adapters))
    print(report.table(by=args.by))
    print(f"the budget of {format_flops(max_flops)} FLOPs allows {max_flops // report.step:,} steps at this setting "
          "(training only: validation and forecasts are extra)")
    if planned is not None:
        print(f"\nplanned run: {args.steps:,} steps x {format_flops(report.step)} = {format_flops(planned)} FLOPs "
              f"(log10 {log10(planned):.2f})")
    return EXIT_OK
