"""FLOPs of fine-tuning Qwen2.5 with LoRA, counted from the model's own modules, and the budget ledger of all runs.

    python flops.py                              # per-layer table, Qwen2.5-0.5B, batch 4 x ctx 512, LoRA r=4 on q/v
    python flops.py --rank 8 --ctx 768 --steps 2000
    python flops.py --model tiny --rank 0 --json
    python flops.py --runs runs                  # what every run spent, cumulative, what is left of 1e17
    python flops.py --runs runs --steps 3000     # ... and whether a planned run of 3000 steps still fits

The model is built on the meta device (shapes only, no weights), so this takes a fraction of a second beyond
importing torch. Counting conventions: `qwen_mini/flops.py`.
"""
from __future__ import annotations

import argparse
import json
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

from qwen_mini import PRESETS, ConfigError, QwenConfig
from qwen_mini.budget import (DEFAULT_BUDGET, BudgetExceeded, LedgerError, check_budget, format_ledger, log10,
                              read_ledger)
from qwen_mini.cli import non_negative_int, positive_int
from qwen_mini.flops import COSTS, FlopCountError, count_forward, format_flops, meta_model

# Defaults of train.py: the setting the users quote.
DEFAULT_MODEL = "qwen2.5-0.5b"
DEFAULT_BATCH, DEFAULT_CTX, DEFAULT_RANK = 4, 512, 4
DEFAULT_TARGETS = ("q_proj", "v_proj")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class UsageError(Exception):
    """A flag value this tool cannot use (reported as a usage error, exit status 2)."""


def flop_count(text: str) -> int:
    """'1e17' or '100000000000000000' -> exact int (no float rounding)."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"expected a FLOP count such as 1e17, got {text!r}") from None
    if not value.is_finite() or value <= 0 or value != value.to_integral_value():
        raise argparse.ArgumentTypeError(f"expected a positive whole FLOP count such as 1e17, got {text!r}")
    return int(value)


def cost_override(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or name not in COSTS:
        raise argparse.ArgumentTypeError(f"expected PRIMITIVE=FLOPS with PRIMITIVE one of {', '.join(COSTS)}, "
                                         f"got {text!r}")
    try:
        return name, non_negative_int(value)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def target_list(text: str) -> tuple[str, ...]:
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if not targets or unknown:
        raise argparse.ArgumentTypeError(f"unknown LoRA target(s) {', '.join(unknown) or repr(text)}; choose from "
                                         f"{','.join(LORA_TARGETS)}")
    return tuple(dict.fromkeys(targets))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flops.py",
        description="FLOPs of one training step of Qwen2.5 + LoRA, per layer, counted from the model's modules "
                    "(backward = 2 x forward; only training counts against the budget). With --runs: the budget "
                    "ledger of all training runs.",
        epilog="Counting conventions (primitive costs, matmul = m*p*(2n-1), softmax, RoPE tables, loss): see the "
               "docstring of qwen_mini/flops.py. Exit status: 0 ok, 1 a planned run (--runs with --steps) does not "
               "fit the budget, 2 bad arguments.")
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
                         help=f"comma-separated projections that get adapters, from: {', '.join(LORA_TARGETS)} "
                              f"(default {','.join(DEFAULT_TARGETS)})")
    setting.add_argument("--steps", type=positive_int, default=None,
                         help="training steps of a planned run: prints the run's total FLOPs (and with --runs, "
                              "whether it fits the remaining budget)")
    setting.add_argument("--seed", type=int, default=None,
                         help="accepted like the other tools' --seed; counting is deterministic and ignores it")
    counting = parser.add_argument_group("counting")
    counting.add_argument("--gqa", choices=("real", "mha"), default="real",
                          help="real: k/v projections to the model's key/value heads (default); mha: the common "
                               "simplification that counts grouped-query attention as multi-head attention")
    counting.add_argument("--cost", type=cost_override, action="append", default=[], metavar="PRIMITIVE=FLOPS",
                          help=f"override one primitive's cost, e.g. --cost exp=1 (repeatable); defaults: "
                               f"{', '.join(f'{k}={v}' for k, v in COSTS.items())}")
    counting.add_argument("--by", choices=("layer", "component"), default="layer",
                          help="table rows: one per layer (default) or one per operation summed over the layers")
    budget = parser.add_argument_group("budget ledger")
    budget.add_argument("--runs", type=Path, metavar="DIR",
                        help="directory of training runs: print every run's FLOPs (from its flops.json), the "
                             "cumulative total and what is left of the budget")
    budget.add_argument("--max-flops", type=flop_count, default=DEFAULT_BUDGET, metavar="FLOPS",
                        help="the budget for all training runs together (default 1e17)")
    parser.add_argument("--json", action="store_true", help="print JSON (exact integer counts) instead of tables")
    return parser


def load_config(args) -> QwenConfig:
    if args.config is not None:
        return QwenConfig.from_hf(args.config)
    name = args.model or DEFAULT_MODEL
    if name in PRESETS:
        return QwenConfig.from_name(name)
    if Path(name).exists():
        return QwenConfig.from_hf(name)
    raise UsageError(f"--model {name!r} is neither a preset ({', '.join(PRESETS)}) nor a local directory with "
                     "config.json; for a downloaded checkpoint pass its config with --config")


def build_model(config: QwenConfig, args):
    """The model on the meta device, with adapters injected as train.py does. Returns (model, lora description)."""
    model = meta_model(config)
    if args.rank == 0:
        return model, {"rank": 0, "trainable_parameters": sum(p.numel() for p in model.parameters())}
    try:
        import lora
        inject = lora.inject
    except (ImportError, AttributeError) as e:
        raise UsageError(f"--rank {args.rank} needs the lora package (lora/lora.py with inject): {e}; "
                         "use --rank 0 to count without adapters") from None
    alpha = args.rank if args.alpha is None else args.alpha
    trainable = inject(model, args.rank, alpha, targets=args.targets, dropout=args.dropout)
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


def ledger_summary(rows, max_flops: int) -> dict:
    used = sum(row.flops_used for row in rows)
    cumulative, runs = 0, []
    for row in rows:
        cumulative += row.flops_used
        runs.append({"run_name": row.run_name, "path": str(row.path), "steps_done": row.steps_done,
                     "per_step_flops": row.per_step_flops, "flops_used": row.flops_used,
                     "log10_flops_used": log10(row.flops_used) if row.flops_used else None,
                     "cumulative_flops": cumulative, "planned_flops": row.planned_flops, "config": row.config})
    return {"runs": runs, "spent": used, "log10_spent": log10(used) if used else None, "max_flops": max_flops,
            "remaining": max_flops - used, "log10_remaining": log10(max_flops - used) if max_flops > used else None}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args)
        model, adapters = build_model(config, args)
        report = count_forward(model, args.batch, args.ctx, gqa=args.gqa, costs=dict(args.cost))
        rows = read_ledger(args.runs) if args.runs is not None else None
        if args.runs is not None and not args.runs.is_dir():
            raise UsageError(f"--runs {args.runs}: no such directory")
    except (UsageError, ConfigError, FlopCountError, LedgerError, ValueError) as e:
        print(f"flops.py: error: {e}", file=sys.stderr)
        return 2

    settings = {"model": config.name, "batch": args.batch, "ctx": args.ctx, "gqa": args.gqa, "lora": adapters,
                "steps": args.steps, "max_flops": args.max_flops}
    planned = args.steps * report.step if args.steps else None
    output: dict = {"settings": settings, "per_step_flops": report.step}
    status, refusal = 0, None
    if rows is None:
        output["report"] = report.to_dict()
    else:
        output["ledger"] = ledger_summary(rows, args.max_flops)
    if planned is not None:
        output["planned_run"] = {"steps": args.steps, "flops": planned, "log10_flops": log10(planned)}
        if rows is not None:
            try:
                remaining = check_budget(planned, args.runs, args.max_flops, per_step_flops=report.step)
                output["planned_run"].update(fits=True, remaining_after=remaining)
            except BudgetExceeded as e:
                refusal, status = str(e), 1
                output["planned_run"].update(fits=False, refused=refusal)

    if args.json:
        print(json.dumps(output, indent=2))
        return status

    print(describe(config, adapters))
    if rows is None:
        print(report.table(by=args.by))
        fit = args.max_flops // report.step
        print(f"the budget of {format_flops(args.max_flops)} FLOPs allows {fit:,} steps at this setting")
    else:
        print(f"FLOPs per training step at this setting: {format_flops(report.step)} (batch {args.batch} x ctx "
              f"{args.ctx}, gqa={args.gqa})\n")
        print(f"budget ledger of {args.runs}:")
        print(format_ledger(rows, args.max_flops))
    if planned is not None:
        print(f"\nplanned run: {args.steps:,} steps x {format_flops(report.step)} = {format_flops(planned)} FLOPs "
              f"(log10 {log10(planned):.2f})")
        if refusal:
            print(f"REFUSED: {refusal}", file=sys.stderr)
        elif rows is not None:
            print(f"fits: {format_flops(output['planned_run']['remaining_after'])} FLOPs of the budget left after it")
    return status


if __name__ == "__main__":
    sys.exit(main())
