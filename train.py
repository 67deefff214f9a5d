"""Fine-tune Qwen2.5 with LoRA on Lotka-Volterra series under a FLOP budget: `python train.py --help`.

The command line is `training.cli`; the run itself is `training.loop.train_run`, grids `training.grid.run_grid`,
and `training.run.load_run` reads a finished run back.
"""
import sys

from training.cli import main

if __name__ == "__main__":
    sys.exit(main())
