"""The run directory: what a training run writes, and `load_run`, which the forecaster uses to read it back.

    <run>/config.json     every setting, the data source and its sha256, the train/val/test split, model spec,
                          trainable parameters, the step this (resumed) process started at
    <run>/metrics.jsonl   one JSON line per step: step, train_loss, val_loss (null between evaluations), lr,
                          grad_norm (before clipping), flops (training FLOPs so far), tokens_per_s (window
                          positions, padding included), skipped (float16: the gradients overflowed, so the step
                          changed no weight; its grad_norm is null), skipped_steps (how many so far); step 0 holds
                          the untrained model's val loss
    <run>/loss_curve.png  train and validation loss against steps
    <run>/flops.json      the run's record in the FLOP budget ledger (the `ledger` package)
    <run>/checkpoint.pt   the latest resumable state: trainable weights, optimizer, scheduler, data position, RNG
    <run>/adapter/        LoRA runs: the adapter in Hugging Face PEFT format (adapter_config.json + safetensors)
    <run>/model/          --full runs: every weight (config.json + model.safetensors) and the tokenizer
    <run>/run.lock        locked by the process training the run, which writes its pid, host and start time into
                          it: a second train.py on the directory is refused, naming that process

This layout is read by forecast.py; keep it, and `load_run`, stable.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

import lora
from qwen_mini import load_model_and_tokenizer

from .config import ConfigError, TrainConfig

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss_curve.png"
CHECKPOINT_NAME = "checkpoint.pt"
LOCK_NAME = "run.lock"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"


class RunDirError(ValueError):
    """A run directory that is missing, incomplete or does not match the run being started."""


def weights_saved(run_dir: Path) -> bool:
    """The run saved its weights whole: the file each save writes last is there (adapter_config.json after the
    adapter's tensors; tokenizer_config.json after the model and its tokenizer, --full), not a directory that a
    process killed while saving left half-written."""
    return (Path(run_dir) / ADAPTER_DIR / lora.ADAPTER_CONFIG_NAME).is_file() \
        or (Path(run_dir) / MODEL_DIR / "tokenizer_config.json").is_file()


# Steps averaged for the "final train loss" of summaries (one step's loss is noisy).
FINAL_TRAIN_STEPS = 10


@dataclass
class RunResult:
    run_dir: Path
    config: TrainConfig
    steps_done: int
    per_step_flops: int
    flops_used: int  # training + validation FLOPs the ledger counts for this run (steps redone after a crash too)
    metrics: list[dict]
    model: nn.Module | None = field(default=None, repr=False)  # the trained model, on rank 0
    tokenizer: object = field(default=None, repr=False)
    counted: bool = True  # in the ledger of its --runs-dir (False: --no-budget outside it)
    gqa: str = "real"  # how its FLOPs count attention

    @property
    def val_losses(self) -> list[tuple[int, float]]:
        return [(m["step"], m["val_loss"]) for m in self.metrics if m.get("val_loss") is not None]

    def summary_row(self) -> dict:
        train = [m["train_loss"] for m in self.metrics if m.get("train_loss") is not None]
        val = self.val_losses
        return {
            "run": self.run_dir.name, "run_dir": str(self.run_dir), "lr": self.config.lr,
            "rank": None if self.config.full else self.config.rank, "ctx": self.config.ctx,
            "steps": self.steps_done,
            "final_train_loss": sum(train[-FINAL_TRAIN_STEPS:]) / len(train[-FINAL_TRAIN_STEPS:]) if train else None,
            "initial_val_loss": val[0][1] if val and val[0][0] == 0 else None,
            "final_val_loss": val[-1][1] if val else None,
            "best_val_loss": min(v for _, v in val) if val else None,
            "per_step_flops": self.per_step_flops, "flops_used": self.flops_used, "counted": self.counted,
            "gqa": self.gqa,
        }


SETTING_NAMES = frozenset(f.name for f in fields(TrainConfig))


def read_run_config(run_dir: str | os.PathLike) -> dict:
    """The run's config.json as a dict."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        raise RunDirError(f"{run_dir}: not a training run directory (no {CONFIG_NAME}; train.py writes it when a run "
                          "starts)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path}: unreadable run config ({e})") from None
    if not isinstance(config, dict):
        raise RunDirError(f"{path}: not a train.py run config (a JSON {type(config).__name__}, not an object)")
    missing = [key for key in ("model", "full") if key not in config]
    if missing:
        raise RunDirError(f"{path}: not a train.py run config (missing {', '.join(missing)})")
    try:  # the settings it records, by TrainConfig's rules: a hand-edited "ctx": [1] is named, not used
        TrainConfig(**{key: value for key, value in config.items() if key in SETTING_NAMES})
    except ConfigError as e:
        raise RunDirError(f"{path}: not a train.py run config ({e})") from None
    return config


def read_metrics(run_dir: str | os.PathLike, drop_torn_tail: bool = False) -> list[dict]:
    """The run's metrics.jsonl, one dict per line (empty if the run has not logged anything yet). A line that is not
    a JSON object with a whole-number "step" raises RunDirError naming it, except, with drop_torn_tail, a last line
    without its newline: what a process killed in the middle of appending leaves; it is dropped with a warning."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path}: unreadable ({e})") from None
    lines = text.split("\n")  # the last element is "" when the file ends with a newline
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if drop_torn_tail and number == len(lines):
                print(f"warning: {path}:{number}: dropped the last line, cut short by a process that stopped while "
                      f"writing it: {line[:60]!r}", file=sys.stderr)
                continue
            raise RunDirError(f"{path}:{number}: not a JSON line ({e})") from None
        if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
            raise RunDirError(f"{path}:{number}: not a metrics line (a JSON object with a whole-number step): "
                              f"{line[:60]!r}")
        rows.append(row)
    return rows


def load_run(run_dir: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
             merge: bool = True):
    """(model, tokenizer, run config) of a trained run, in eval mode with every parameter frozen.

    LoRA runs: the base model named in config["model"] (the tiny preset is rebuilt from its recorded seed) with the
    adapter from `adapter/` applied; merge=True folds it into the weights (plain linears, fastest inference).
    --full runs: the weights and tokenizer saved in `model/`. `dtype` None keeps the stored dtype; an adapter is
    merged in float32 before any cast."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    if config["full"]:
        weights = run_dir / MODEL_DIR
        needed = [weights / name for name in ("config.json", "model.safetensors", "tokenizer.json")]
        _require(run_dir, needed, "a --full run saves its weights and tokenizer there when training ends")
        model, tokenizer = load_model_and_tokenizer(weights, dtype=dtype, device=device)
    else:
        adapter = run_dir / ADAPTER_DIR
        needed = [adapter / lora.ADAPTER_CONFIG_NAME, adapter / lora.ADAPTER_WEIGHTS_NAME]
        _require(run_dir, needed, "a LoRA run saves its adapter there when training ends")
        model, tokenizer = load_base_model(config, dtype=None if dtype is None else torch.float32)
        lora.load_adapter(model, adapter)
        if merge:
            lora.merge_and_unload(model)
        model = model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model.eval(), tokenizer, config


def load_base_model(config: dict, device=None, dtype=None):
    """(model, tokenizer) the run started from: its --model (a local directory by its recorded absolute path,
    the tiny preset by its recorded seed), before any training."""
    base = config.get("model_dir") if config.get("model_dir") and Path(config["model_dir"]).is_dir() \
        else config["model"]
    return load_model_and_tokenizer(base, dtype=dtype, device=device, seed=config.get("model_seed") or 0)


def _require(run_dir: Path, paths: list[Path], why: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        names = ", ".join(str(p.relative_to(run_dir)) for p in missing)
        raise RunDirError(f"{run_dir}: missing {names} ({why}; was the run stopped before its last step? "
                          f"`python train.py --out {run_dir} --resume` with its settings finishes it)")
