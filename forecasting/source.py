"""What forecast.py forecasts with: a training run directory (its weights, data, split and decimals) or a plain
model (hub id, local directory or the tiny preset), and which data and split go with it."""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.devices import device_from_flag, dtype_from_flag
from common.fileio import sha256_file
from data.llmtime import DEFAULT_SCALER, scaling_rule
from data.lotka_volterra import DataError, LVData, Split, load_or_simulate, split_indices
from qwen_mini import QwenConfig, load_model_and_tokenizer
from qwen_mini.config import TINY_MODEL_SEED, config_for_model

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
    model_name: str = ""  # the model that forecasts: a run's --model, or the plain model's spec (metrics.json says it)
    notes: list[str] = field(default_factory=list)  # mismatches worth telling the user (also written to the output)
    autocast_dtype: torch.dtype | None = None  # float16: generation under fp16 autocast over float32 weights
    scaler: str = DEFAULT_SCALER  # the LLMTIME scaling rule: a run's own (config.json), else the one asked for

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
             context: int | None = None, device=None, dtype: torch.dtype | None = None,
             scaler: str | None = None) -> ForecastSource:
    """A trained run: its model (adapter merged), its data file and train/val/test split, its decimals. Another
    data file (`data_path`) is split afresh the way the run's data was (ordered, or random with its seed), with a
    note saying so. The data is found before the weights are loaded: a run whose data file is gone is refused first."""
    from training.run import load_base_model, load_run, read_run_config

    dtype, autocast_dtype = weights_and_autocast(dtype)
    config = read_run_config(run_dir)
    data_file, own_data, source_note = run_data_file(run_dir, config, data_path)
    if not own_data:
        data = load_or_simulate(data_file)
        recorded = config.get("split", {})
        split = split_indices(len(data), seed=recorded.get("seed", DEFAULT_SPLIT_SEED),
                              mode=recorded.get("mode", "random"))  # a record without a mode was random
        origin = f"{split.describe()} over {data.path} (not the run's data)"
        source_note.append(f"--data {data_path} is not the data run {run_dir} trained on "
                           f"({trained_data(config) or 'the default simulated set'}); its trajectories are split "
                           f"afresh as the run's were: {split.describe()}")
    else:
        data = load_or_simulate(data_file)
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
    model, tokenizer, _ = load_run(run_dir, device=device, dtype=dtype)
    run_decimals = config.get("decimals", DEFAULT_DECIMALS)
    if decimals is not None and decimals != run_decimals:
        source_note.append(f"--decimals {decimals} differs from the {run_decimals} the run trained with")
    run_scaler = config.get("scaler", DEFAULT_SCALER)  # runs recorded before the setting: the p95 rule
    if scaler is not None and scaling_rule(scaler) != scaling_rule(run_scaler):
        source_note.append(f"--scaler {scaler} differs from the {run_scaler} the run trained with: prompts are "
                           "scaled differently from what the model learned")
    fit_steps = config.get("fit_steps")
    if context is not None and fit_steps is not None and context != fit_steps:
        source_note.append(f"--context {context}: the run's training texts were scaled on their first {fit_steps} "
                           f"steps, so prompts are scaled differently from what the model learned")

    def load_untrained():
        base, _ = load_base_model(config, device=device, dtype=dtype)
        base.requires_grad_(False)
        return base.eval()

    source = ForecastSource(model, tokenizer, str(run_dir), run_decimals if decimals is None else decimals, data,
                            split, origin, load_untrained, Path(run_dir) / "forecast", model_name=config["model"],
                            autocast_dtype=autocast_dtype, scaler=scaling_rule(scaler or run_scaler).name)
    for message in source_note:
        source.note(message)
    return source


SIMULATED_PREFIX = "lv_simulated_"  # data.lotka_volterra.default_data_path's names: the built-in set's cache


def trained_data(config: dict) -> str | None:
    """The data file a run trained on, as its config records it; None: the built-in simulated set (runs recorded
    before config.json had "data" name its cache in "data_source")."""
    if "data" in config:
        return config["data"]
    source = config.get("data_source")
    return None if source is None or Path(source).name.startswith(SIMULATED_PREFIX) else source


def run_data_file(run_dir, config: dict, data_path: str | None) -> tuple[str | None, bool, list[str]]:
    """(the data file to forecast (None: the built-in simulated set), whether it is the run's own data, so that its
    recorded split applies, notes). `data_path` (--data) is the run's data when it is the same file or has the
    sha256 recorded at training (a moved copy). A run whose data file is gone is refused (DataError) naming it: the
    simulated set in its place would be another data set under the same name."""
    trained_on = trained_data(config)
    if data_path is None:
        if trained_on is not None and not Path(trained_on).is_file():
            raise DataError(f"run {run_dir} trained on {trained_on}, which is not there any more (moved or deleted): "
                            f"pass --data with where it is now (the run's own split is kept when its sha256 is the "
                            f"recorded one)")
        return trained_on, True, []
    if trained_on is not None and Path(trained_on).is_file() and \
            Path(data_path).resolve() == Path(trained_on).resolve():
        return data_path, True, []
    recorded_sha = config.get("data_sha256")
    if recorded_sha and Path(data_path).is_file() and sha256_file(data_path) == recorded_sha:
        moved = [] if trained_on is None else [
            f"--data {data_path} holds the data run {run_dir} trained on (moved from {trained_on}: the same sha256), "
            "so the run's own split is used"]
        return data_path, True, moved
    return data_path, False, []


def from_model(spec: str, *, data_path: str | None = None, decimals: int | None = None, device=None,
               dtype: torch.dtype | None = None, scaler: str | None = None) -> ForecastSource:
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
                          Path("forecasts") / name, model_name=str(spec), autocast_dtype=autocast_dtype,
                          scaler=scaling_rule(scaler or DEFAULT_SCALER).name)


def planned_model(run_dir=None, spec: str | None = None) -> tuple[QwenConfig | None, int]:
    """(the architecture of the model a forecast of `run_dir` or `spec` will load, read without its weights; the
    decimals it forecasts with by default). The architecture is None where it cannot be read so (a damaged run, a hub
    id out of reach): checks that need it then wait for the loaded model, whose loader says what is wrong."""
    from training.run import MODEL_DIR, read_run_config

    try:
        if run_dir is None:
            return config_for_model(spec), DEFAULT_DECIMALS
        config = read_run_config(run_dir)
        decimals = config.get("decimals", DEFAULT_DECIMALS)
        if config["full"]:
            return QwenConfig.from_hf(Path(run_dir) / MODEL_DIR / "config.json"), decimals
        local = config.get("model_dir")
        return config_for_model(local if local and Path(local).is_dir() else config["model"]), decimals
    except (ValueError, OSError, KeyError, RuntimeError):
        return None, DEFAULT_DECIMALS


def pick_device(name: str) -> torch.device:
    """'auto': CUDA when available, else CPU; a device this machine does not have: ValueError (`device_from_flag`)."""
    return device_from_flag(name)
