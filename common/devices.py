"""The --device flag of every tool: 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', checked against what this machine and
this build of torch have, so a missing accelerator is one clear line before anything loads (torch itself only
fails later, deep inside the first tensor moved there)."""
from __future__ import annotations

import torch

DEVICE_TYPES = ("cpu", "cuda", "mps")


def device_from_flag(name: str, flag: str = "--device") -> torch.device:
    """The torch.device `name` asks for ('auto': CUDA when available, else CPU); ValueError naming the flag and the
    value when it is not a device, or one this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{flag} {name!r} is not a device ({e}); use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"{flag} {name!r}: device type {device.type!r} is not supported; use auto, cpu, cuda, "
                         "cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {name}: no CUDA device is available to this torch {torch.__version__} "
                             f"(built with CUDA {torch.version.cuda or 'none'}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {name}: no MPS (Apple GPU) device is available; use --device cpu or auto")
    return device


DTYPES = ("auto", "float32", "bfloat16", "float16")


def dtype_from_flag(name: str, device: torch.device, flag: str = "--dtype") -> str:
    """The precision `name` asks for on `device`, as 'float32', 'bfloat16' or 'float16' (every tool resolves --dtype
    here). auto: bfloat16 on CUDA GPUs that support it natively (Ampere and later), float16 on older CUDA GPUs,
    float32 on CPU and MPS. ValueError naming the flag for a name that is not a dtype, and for bfloat16 on MPS."""
    if name not in DTYPES:
        raise ValueError(f"{flag} {name!r} is not a dtype; use {', '.join(DTYPES)}")
    if name == "auto":
        if device.type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
        return "float32"
    if name == "bfloat16" and device.type == "mps":
        raise ValueError(f"{flag} bfloat16 is not supported on mps (Apple GPUs); use --dtype float16 or float32")
    return name
