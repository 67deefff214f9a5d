"""What forecast.py forecasts with: a training run directory (its weights, data, split and decimals) or a plain
model (hub id, local directory or the tiny preset), and which data and split go with it."""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from data.lotka_volterra import LVData, Split, load_or_simulate, split_indices
from qwen_mini import load_model_and_tokenizer
from qwen_mini.config import TINY_MODEL_SEED
from common.devices import device_from_flag, dtype_from_flag
from common.fileio import sha256_file

from .config import DEFAULT_DECIMALS

DEFAULT_SPLIT_SEED = 0  # train.py's --split-seed default (used only by a random split)


@dataclass
class ForecastSource:
    model: torch.nn.Module
    tokenizer: object
    label: str  # how the output names it: the run directory or the model spec
    decimals: int
    data: LVData
    split: Split
    split_origin: str  # where the split came from, for the report
    load_untrained: Callable[[], torch.nn.Module] | None  # the base model before training; None: the model is it
    default_out: Path  # output directory when --out is not given
    notes: list[str] = field(default_factory=list)  # mismatches worth telling the user (also written to the output)
    autocast_dtype: torch.dtype | None = None  # float16: generation under fp16 autocast over float32 weights

    def autocast(self):
        """The autocast the forecasts run under (--dtype float16), else nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device = next(self.model.parameters()).device
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def note(self, message: str) -> None:
        self.notes.append(message)
        print(f"note: {message}", file=sys.stderr)


def parse_dtype(name: str | None, device: torch.device | None = None) -> torch.dtype | None:
    """'auto' (None: the stored dtype), 'float32', 'bfloat16' (the weights) or 'float16' (float32 weights under fp16
    autocast: see `weights_and_autocast`), checked by `common.devices.dtype_from_flag` against `device` (ValueError
    for bfloat16 on mps)."""
    if name in (None, "auto"):
        return None
    try:
        return getattr(torch, dtype_from_flag(name, device or torch.device("cpu")))
    except ValueError:
        if name in ("float32", "bfloat16", "float16"):
            raise
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}") from None


def weights_and_autocast(dtype: torch.dtype | None) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(the dtype to load the weights in, the autocast dtype) for parse_dtype's dtype: float16 forecasts with float32
    weights under fp16 autocast (float16 weights would overflow where autocast keeps norms and the residual stream in
    float32); the others load the weights in that dtype, without autocast."""
    return (torch.float32, torch.float16) if dtype == torch.float16 else (dtype, None)


def from_run(run_dir: str | os.PathLike, *, data_path: str | None = None, decimals: int | None = None,
             context: int | None = None, device=None, dtype: torch.dtype | None = None) -> ForecastSource:
    """A trained run: its model (adapter merged), its data file and train/val/test split, its decimals. Another
    data file (`data_path`) is split afresh the way the run's data was (ordered, or random with its seed), with a
    note saying so."""
    from training.run import load_base_model, load_run

    dtype, autocast_dtype = weights_and_autocast(dtype)
    model, tokenizer, config = load_run(run_dir, device=device, dtype=dtype)
    run_data = config.get("data") or config.get("data_source")
    if run_data and not Path(run_data).is_file():
        run_data = None  # the default simulated set, cached elsewhere now: load_or_simulate rebuilds the same one
    source_note = []
    if data_path is not None and (run_data is None or Path(data_path).resolve() != Path(run_data).resolve()):
        data = load_or_simulate(data_path)
        recorded = config.get("split", {})
        split = split_indices(len(data), seed=recorded.get("seed", DEFAULT_SPLIT_SEED),
                              mode=recorded.get("mode", "random"))  # a record without a mode was random
        origin = f"{split.describe()} over {data.path} (not the run's data)"
        trained_on = run_data or "the default simulated set"
        source_note.append(f"--data {data_path} is not the data run {run_dir} trained on ({trained_on}); its "
                           f"trajectories are split afresh as the run's were: {split.describe()}")
    else:
        data = load_or_simulate(run_data if data_path is None else data_path)
        if "split" not in config:
            raise ValueError(f"{run_dir}: the run config records no train/val/test split")
        split = Split.from_dict(config["split"])
        if split.n != len(data):
            raise ValueError(f"run {run_dir} split {split.n} trajectories but {data.path} has {len(data)}: "
                             f"the data file changed since training")
        recorded_sha = config.get("data_sha256")
        if recorded_sha and data.path and sha256_file(data.path) != recorded_sha:
            source_note.append(f"{data.path} changed since run {run_dir} trained on it (its sha256 is not the "
                               f"{recorded_sha[:12]}... recorded then): the run's test split may now hold other "
                               "trajectories, even ones it trained on")
        origin = f"the run's ({split.describe()})"
    run_decimals = config.get("decimals", DEFAULT_DECIMALS)
    if decimals is not None and decimals != run_decimals:
        source_note.append(f"--decimals {decimals} differs from the {run_decimals} the run trained with")
    fit_steps = config.get("fit_steps")
    if context is not None and fit_steps is not None and context != fit_steps:
        source_note.append(f"--context {context}: the run's training texts were scaled on their first {fit_steps} "
                           f"steps, so prompts are scaled differently from what the model learned")

    def load_untrained():
        base, _ = load_base_model(config, device=device, dtype=dtype)
        base.requires_grad_(False)
        return base.eval()

    source = ForecastSource(model, tokenizer, str(run_dir), run_decimals if decimals is None else decimals, data,
                            split, origin, load_untrained, Path(run_dir) / "forecast", autocast_dtype=autocast_dtype)
    for message in source_note:
        source.note(message)
    return source


def from_model(spec: str, *, data_path: str | None = None, decimals: int | None = None, device=None,
               dtype: torch.dtype | None = None) -> ForecastSource:
    """A model as it is (no run): the trajectories are split as train.py splits them by default (in file order,
    the last 15 % test)."""
    dtype, autocast_dtype = weights_and_autocast(dtype)
    model, tokenizer = load_model_and_tokenizer(spec, dtype=dtype, device=device, seed=TINY_MODEL_SEED)
    model.requires_grad_(False)
    data = load_or_simulate(data_path)
    split = split_indices(len(data), seed=DEFAULT_SPLIT_SEED)
    name = Path(str(spec).rstrip("/")).name or str(spec)
    return ForecastSource(model.eval(), tokenizer, str(spec), DEFAULT_DECIMALS if decimals is None else decimals,
                          data, split, f"{split.describe()}, as train.py splits it by default", None,
                          Path("forecasts") / name, autocast_dtype=autocast_dtype)


def pick_device(name: str) -> torch.device:
    """'auto': CUDA when available, else CPU; a device this machine does not have: ValueError (`device_from_flag`)."""
    return device_from_flag(name)
