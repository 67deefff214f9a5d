"""Fine-tune Qwen2.5 with LoRA on Lotka-Volterra series under a FLOP budget: `python train.py --help`.

The command line is `training.cli`; the run itself is `training.loop.train_run`, grids `training.grid.run_grid`,
and `training.run.load_run` reads a finished run back. `--plan FILE` hands the whole study to `study.cli`, which
sits above training (training never imports it).
"""
import sys

import training.cli
from study.cli import add_job_arguments, plan_command


def main(argv: list[str] | None = None, again: str | None = None) -> int:
    """`again`: the command that continues a stopped training, for its line (demo.py passes its own)."""
    return training.cli.main(argv, run_plan=plan_command, plan_arguments=add_job_arguments, again=again)


if __name__ == "__main__":
    sys.exit(main())
