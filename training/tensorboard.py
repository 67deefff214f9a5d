"""TensorBoard event files of a run (--tensorboard): the values of every metrics.jsonl line, written as scalars.

metrics.jsonl stays the record of truth: `BoardLog.log` is given the very dict that became the line, so the two
cannot disagree. Against the step (in the log directory itself): loss/train, loss/val, loss/val_last/<N>, optim/lr,
optim/grad_norm, speed/tokens_per_s, flops/used. Against the FLOPs used (in its by_flops/ subdirectory):
by_flops/train_loss and by_flops/val_loss.

TensorBoard's x-axis is an event's integer global_step, so the FLOPs-axis scalars are written with global_step = the
line's cumulative training FLOPs (an int). They live in a directory (a TensorBoard run) of their own because
TensorBoard's reader treats a step lower than the last one it read as a restart and drops the later values of that
tag: steps and FLOPs in one file would erase each other. On --resume each writer opens a new event file in the same
directory with purge_step = the first step (or FLOPs) it writes, so values a stopped process logged past its
checkpoint are hidden, not shown twice (TensorBoard merges the files).

The tensorboard package is imported only when the flag is set.
"""
from __future__ import annotations

from pathlib import Path

from .config import ConfigError

PACKAGE = "tensorboard==2.21.0"
FLOPS_DIR = "by_flops"
# metrics.jsonl key -> tag against the step
STEP_TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "val_loss_last": "loss/val_last", "lr": "optim/lr",
             "grad_norm": "optim/grad_norm", "tokens_per_s": "speed/tokens_per_s", "flops": "flops/used"}
# metrics.jsonl key -> tag against the cumulative FLOPs
FLOPS_TAGS = {"train_loss": "by_flops/train_loss", "val_loss": "by_flops/val_loss"}


class TensorBoardMissing(ConfigError):
    """--tensorboard without the tensorboard package (train.py: one line, exit status 2)."""


def summary_writer_class():
    """torch's SummaryWriter, or TensorBoardMissing naming the package to install."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it; its own error is less clear)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TensorBoardMissing(f"--tensorboard needs the tensorboard package: pip install {PACKAGE}") from None
    return SummaryWriter


class NoBoard:
    """What a run without --tensorboard (or a process other than rank 0) logs to: nothing."""

    def log(self, entry: dict) -> None:
        pass

    def close(self) -> None:
        pass


class BoardLog(NoBoard):
    """A run's two SummaryWriters (against the step, against the FLOPs) under `log_dir`. `first_step`: the first
    step this process logs (0 for a fresh run, the checkpoint's step + 1 on --resume); `per_step_flops`: the training
    FLOPs of one step, so first_step * per_step_flops is the first FLOPs-axis step."""

    def __init__(self, log_dir: Path, first_step: int, per_step_flops: int):
        writer = summary_writer_class()
        self.log_dir = Path(log_dir)
        # flush_secs: a killed process loses at most 10 s of events (metrics.jsonl loses none).
        self.by_step = writer(str(self.log_dir), purge_step=first_step, flush_secs=10)
        self.by_flops = writer(str(self.log_dir / FLOPS_DIR), purge_step=first_step * per_step_flops, flush_secs=10)

    def log(self, entry: dict) -> None:
        """The scalars of one metrics.jsonl line (None values are skipped)."""
        step, flops = int(entry["step"]), int(entry["flops"])
        for key, tag in STEP_TAGS.items():
            value = entry.get(key)
            if isinstance(value, dict):  # val_loss_last: {"N": loss over each window's last N targets}
                for part, number in value.items():
                    if number is not None:
                        self.by_step.add_scalar(f"{tag}/{part}", float(number), global_step=step)
            elif value is not None:
                self.by_step.add_scalar(tag, float(value), global_step=step)
        for key, tag in FLOPS_TAGS.items():
            if entry.get(key) is not None:
                # global_step must be an int: the cumulative FLOPs are (1e17 fits an int64).
                self.by_flops.add_scalar(tag, float(entry[key]), global_step=flops)

    def close(self) -> None:
        self.by_step.close()
        self.by_flops.close()


def open_board(config, first_step: int, per_step_flops: int) -> NoBoard:
    """The run's logger: a BoardLog in config.tensorboard_path with --tensorboard, else a NoBoard."""
    if not config.tensorboard:
        return NoBoard()
    return BoardLog(config.tensorboard_path, first_step, per_step_flops)
