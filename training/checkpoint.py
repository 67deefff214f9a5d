"""Resumable training state in `<run>/checkpoint.pt`, written atomically (temporary file + rename).

A checkpoint holds only what the run cannot rebuild from its settings: the trainable parameters (the adapters of a
LoRA run, every weight of a --full run), the optimizer and scheduler states, the data position and the RNG states.
Restoring it and running on gives the same losses as never stopping (bit for bit on CPU).
"""
from __future__ import annotations

import random
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.fileio import atomic_write
from qwen_mini.loading import check_finite

from .run import CHECKPOINT_NAME, RunDirError

FORMAT_VERSION = 1
STATE_KEYS = ("step", "data_position", "flops_used", "trajectory", "trainable", "optimizer", "scheduler", "rng")


def rng_states() -> dict:
    """Every random generator a run may draw from (torch CPU and CUDA for dropout and init; Python and NumPy's
    global generators in case user code draws from them), as tensors and plain values that torch.load reads with
    weights_only=True."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": random.getstate(),
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy = states["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    random.setstate(states["python"])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained, by name, on the CPU."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, *, model: nn.Module, optimizer, scheduler, step: int, data_position: dict,
                    flops_used: int, trajectory: dict, scaler=None, skipped_steps: int = 0,
                    continued_from_step: int = 0) -> Path:
    state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "data_position": data_position,
        "flops_used": flops_used,
        "trajectory": trajectory,  # the settings that produced it, checked when resuming
        "trainable": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_states(),
        # float16 runs: the dynamic loss scale and its growth tracker ({} when disabled), and the overflow steps
        # skipped so far (optional keys: checkpoints written before float16 lack them).
        "grad_scaler": scaler.state_dict() if scaler is not None else {},
        "skipped_steps": skipped_steps,
        # --continue-from: the step of the run it continued, whose steps up to there are not this run's FLOPs
        # (optional key: 0 when absent).
        "continued_from_step": continued_from_step,
    }
    return atomic_write(Path(run_dir) / CHECKPOINT_NAME, lambda tmp: _save(state, tmp))


def _save(state: dict, path: str) -> None:
    # Through a Python file object: a failed write (a full disk) then raises OSError, where torch.save(state, path)
    # reports it as an opaque RuntimeError from its zip writer.
    with open(path, "wb") as f:
        torch.save(state, f)


def read_checkpoint(run_dir: Path, mmap: bool = False) -> dict | None:
    """The run's checkpoint (None if it has none); RunDirError says what is wrong with a damaged one, or names a
    tensor holding NaN or infinity. mmap=True maps the tensors instead of reading (and checking) them: a cheap way
    to look at the step of a large checkpoint."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    if not zipfile.is_zipfile(path):  # torch's own errors for this are "[Errno 22] Invalid argument" and the like
        raise damaged(path, f"{path.stat().st_size} bytes that are not a whole checkpoint (the end of its zip "
                            "archive is missing: truncated or overwritten)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises several types for damaged or foreign files
        raise damaged(path, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise damaged(path, f"not a train.py checkpoint of format {FORMAT_VERSION}")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise damaged(path, f"it lacks {', '.join(missing)}")
    if not mmap:  # a peek at the step need not read every tensor
        for tensors in (state["trainable"], optimizer_tensors(state["optimizer"])):
            check_finite(tensors, path, error=RunDirError)
    return state


def damaged(path: Path, what: str) -> RunDirError:
    """The error for a checkpoint that cannot be resumed from: what is wrong, and what the user can do. (Checkpoints
    are written atomically, so a damaged one was altered after it was written.)"""
    return RunDirError(f"{path}: damaged checkpoint ({what}); the run cannot continue from it: put back a good copy "
                       f"of the file, or train again with another --out")


def restore_checkpoint(state: dict, *, model: nn.Module, optimizer, scheduler, scaler=None) -> None:
    """Put a checkpoint's weights, optimizer, scheduler, loss scaler and RNG states back (the data position follows
    from the step)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    saved = state["trainable"]
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise RunDirError(f"checkpoint does not fit the model: {len(missing)} trainable tensor(s) missing "
                          f"(e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})")
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise RunDirError(f"checkpoint tensor {name!r} has shape {tuple(saved[name].shape)}, the model's "
                                  f"{tuple(p.shape)}")
            p.copy_(saved[name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    set_rng_states(state["rng"])


def optimizer_tensors(optimizer_state: dict) -> dict[str, torch.Tensor]:
    """The tensors of an optimizer state dict (AdamW's moments), by a readable name."""
    return {f"optimizer.state.{index}.{key}": value for index, slots in optimizer_state.get("state", {}).items()
            for key, value in slots.items() if isinstance(value, torch.Tensor)}
