"""`train.py --plan FILE`: the flags a plan may take from the command line, then `run_plan`."""
from __future__ import annotations

import argparse
import sys

from common.exit_codes import EXIT_OK, EXIT_USAGE

from .plan import TRAIN_KEYS, PlanError, load_plan, with_train_settings
from .run import run_plan

# With --plan, these flags override the plan's [study]; the flags of [train] settings override its [train].
PLAN_FLAGS = ("plan", "runs_dir", "max_flops", "gqa", "device", "dtype", "seed")


def plan_command(args: argparse.Namespace, parser: argparse.ArgumentParser, dist) -> int:
    """Run the study plan `args.plan` (train.py's parser and process group); 0 when every stage is done."""
    if dist.enabled:
        parser.error("--plan runs its stages one after another in one process: start it without torchrun")
    changed = {dest: value for dest, value in vars(args).items()
               if dest not in PLAN_FLAGS and value != parser.get_default(dest)}
    overrides = {}
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
        value = getattr(args, dest)
        return None if value == parser.get_default(dest) else value

    try:
        plan = with_train_settings(load_plan(args.plan, runs_dir=given("runs_dir"), max_flops=given("max_flops"),
                                             gqa=args.gqa), overrides)
        study = run_plan(plan, device=given("device"), dtype=given("dtype"), seed=given("seed"))
    except PlanError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"\n[plan] study {plan.name} done: {plan.study_dir}/")
    for stage in study["stages"]:
        if stage["kind"] == "train":
            print(f"[plan]   {stage['name']}: {len(stage['runs'])} run(s), best {stage['best']} "
                  f"(validation loss {stage['best_val_loss']:.4f}; chosen by the "
                  f"{stage.get('criterion', 'lowest validation loss')})")
        else:
            print(f"[plan]   {stage['name']}: forecasts in {', '.join(stage['forecasts'])}")
    print(f"[plan] next: python report.py {plan.runs_dir} ; python flops.py --runs {plan.runs_dir}")
    return EXIT_OK
