"""Training runs: the FLOP plan and reservation (`budget`), the run directory's lock and resume checks (`rundir`),
model and optimizer setup (`setup`), the loop, checkpoints, grids, data-parallel training and the run-directory layout.

    from training import TrainConfig, train_run, load_run
    result = train_run(TrainConfig(model="tiny", full=True, steps=50, ctx=128, batch=8, lr=3e-3, out="runs/demo"))
    model, tokenizer, config = load_run("runs/demo")
"""
from .config import ConfigError, TrainConfig
from .grid import expand_grid, format_summary, run_grid
from .loop import train_run
from .run import RunDirError, RunResult, load_run, read_metrics, read_run_config
from .setup import enable_activation_checkpointing

__all__ = ["ConfigError", "RunDirError", "RunResult", "TrainConfig", "enable_activation_checkpointing", "expand_grid",
           "format_summary", "load_run", "read_metrics", "read_run_config", "run_grid", "train_run"]
