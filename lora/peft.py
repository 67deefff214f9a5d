"""LoRA adapters on disk in Hugging Face PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Tensor names are `base_model.model.<module path>.lora_A.weight`, so an adapter saved here loads with
`peft.PeftModel.from_pretrained` on `transformers.Qwen2ForCausalLM` and a PEFT adapter loads here (`load_adapter`
injects the layers of `lora.layer` its config names). Only what the layer implements is accepted.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from common.fileio import atomic_write
from qwen_mini.loading import check_finite, check_state_dict

from .layer import VALID_TARGETS, adaptable_paths, lora_layers, lora_state_dict, mark_only_lora_trainable, wrap

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "PEFT_PREFIX", "AdapterError", "load_adapter",
           "save_adapter"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT stores tensors under the names of `PeftModel.base_model` (a LoraModel) whose `.model` is the HF model.
PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter directory, config or tensor that does not fit the model it is loaded into."""


def _uniform(values: dict[str, object], what: str):
    distinct = set(values.values())
    if len(distinct) != 1:
        raise AdapterError(f"cannot save as one PEFT adapter: LoRA layers differ in {what} ({sorted(distinct)}); "
                           "PEFT's rank_pattern/alpha_pattern are not supported")
    return distinct.pop()


def _target_modules(model: nn.Module, paths: list[str]) -> list[str]:
    """Short names when every layer's projections of those kinds carry an adapter, else the full module paths."""
    kinds = sorted({p.rsplit(".", 1)[-1] for p in paths}, key=VALID_TARGETS.index)
    covered = [p for p in adaptable_paths(model) if p.rsplit(".", 1)[-1] in kinds]
    return kinds if sorted(covered) == sorted(paths) else sorted(paths)


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapters as PEFT does: `adapter_config.json` + `adapter_model.safetensors`.

    Each file is written to a temporary name and moved into place, so a crash never leaves a half-written file."""
    layers = dict(lora_layers(model))
    if not layers:
        raise AdapterError("the model has no LoRA layers to save (call lora.inject first)")
    rank = _uniform({n: layer.rank for n, layer in layers.items()}, "rank")
    alpha = _uniform({n: layer.alpha for n, layer in layers.items()}, "alpha")
    dropout = _uniform({n: getattr(layer.lora_dropout, "p", 0.0) for n, layer in layers.items()}, "dropout")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": _target_modules(model, list(layers)),
        "exclude_modules": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    tensors = {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()}
    meta = [k for k, v in tensors.items() if v.is_meta]
    if meta:
        raise AdapterError(f"cannot save tensor {meta[0]!r}: it is on the meta device (no data)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / ADAPTER_WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write(directory / ADAPTER_CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return directory


# Config entries for PEFT features this implementation does not have: each must be absent or falsy.
_UNSUPPORTED = ("use_dora", "use_rslora", "lora_bias", "fan_in_fan_out", "modules_to_save", "rank_pattern",
                "alpha_pattern", "layers_to_transform", "layer_replication", "target_parameters",
                "trainable_token_indices", "exclude_modules", "use_qalora", "alora_invocation_tokens", "use_bdlora",
                "megatron_config")


def _read_adapter_config(path: Path) -> dict:
    if not path.is_file():
        raise AdapterError(f"{path}: no such file (an adapter directory needs {ADAPTER_CONFIG_NAME} and "
                           f"{ADAPTER_WEIGHTS_NAME})")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"{path}: peft_type is {peft_type!r}; only 'LORA' adapters are supported")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if raw.get(k) is None]
    if missing:
        raise AdapterError(f"{path}: missing required key(s) {', '.join(missing)}")
    if raw.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias={raw['bias']!r} is not supported (only 'none')")
    for key in _UNSUPPORTED:
        if raw.get(key):
            raise AdapterError(f"{path}: {key}={raw[key]!r} is not supported by this LoRA implementation")
    r, alpha, dropout = raw["r"], raw["lora_alpha"], raw.get("lora_dropout", 0.0) or 0.0
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterError(f"{path}: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterError(f"{path}: lora_alpha must be a finite number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise AdapterError(f"{path}: lora_dropout must be a probability in [0, 1), got {dropout!r}")
    return raw


def _resolve_targets(model: nn.Module, target_modules, where: Path) -> list[str]:
    """Module paths PEFT would adapt for `target_modules` (list: exact path or '.'-suffix; str: regex fullmatch)."""
    names = [n for n, _ in model.named_modules() if n]
    allowed = set(adaptable_paths(model))
    if target_modules == "all-linear":
        return [p for p in names if p in allowed]
    if isinstance(target_modules, str):
        try:
            matched = [n for n in names if re.fullmatch(target_modules, n)]
        except re.error as e:
            raise AdapterError(f"{where}: target_modules {target_modules!r} is not a valid regex ({e})") from None
        if not matched:
            raise AdapterError(f"{where}: target_modules {target_modules!r} matches no module of the model")
    elif isinstance(target_modules, list) and all(isinstance(t, str) for t in target_modules) and target_modules:
        matched = []
        for target in target_modules:
            hits = [n for n in names if n == target or n.endswith("." + target)]
            if not hits:
                raise AdapterError(f"{where}: target module {target!r} matches no module of the model; "
                                   f"adaptable projections: {', '.join(VALID_TARGETS)}")
            matched += hits
        matched = [n for n in names if n in set(matched)]
    else:
        raise AdapterError(f"{where}: target_modules must be a non-empty list of names or a regex string, "
                           f"got {target_modules!r}")
    bad = [n for n in matched if n not in allowed]
    if bad:
        raise AdapterError(f"{where}: target_modules selects {bad[0]!r}, which is not one of the adaptable "
                           f"projections ({', '.join(VALID_TARGETS)})")
    return matched


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        hint = " (only safetensors adapters are supported, not adapter_model.bin)" \
            if (path.parent / "adapter_model.bin").is_file() else ""
        raise AdapterError(f"{path}: no such file{hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a PEFT-format LoRA adapter into `model` (in place) and return it.

    A plain model gets LoRA layers injected from `adapter_config.json` (r, lora_alpha, lora_dropout, target_modules);
    a model that already has them must match that config. Tensors load strictly: a missing, unexpected or wrongly
    shaped tensor raises AdapterError naming it. Afterwards only the adapters are trainable."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"{directory}: no such adapter directory")
    config_path, weights_path = directory / ADAPTER_CONFIG_NAME, directory / ADAPTER_WEIGHTS_NAME
    raw = _read_adapter_config(config_path)
    tensors = _read_tensors(weights_path)
    check_finite(tensors, weights_path, error=AdapterError)
    rank, alpha, dropout = raw["r"], raw["lora_alpha"], float(raw.get("lora_dropout") or 0.0)
    paths = _resolve_targets(model, raw["target_modules"], config_path)

    existing = dict(lora_layers(model))
    if existing:
        if sorted(existing) != sorted(paths):
            extra = sorted(set(existing) - set(paths)) or sorted(set(paths) - set(existing))
            raise AdapterError(f"{config_path}: the model already has LoRA layers that differ from the adapter's "
                               f"target_modules (e.g. {extra[0]!r}); load into a model without LoRA layers")
        for name, layer in existing.items():
            if layer.merged:
                raise AdapterError(f"{name} is merged; unmerge before loading new adapter weights")
            if layer.rank != rank or float(layer.alpha) != float(alpha):
                raise AdapterError(f"{config_path}: r={rank}, lora_alpha={alpha} but the model's {name} has "
                                   f"rank={layer.rank}, alpha={layer.alpha}")
    else:
        wrap(model, paths, rank, alpha, dropout)

    params = {PEFT_PREFIX + k: v for k, v in lora_state_dict(model).items()}
    check_state_dict(params, tensors, weights_path, error=AdapterError)
    with torch.no_grad():
        for name, layer in lora_layers(model):
            prefix = PEFT_PREFIX + (f"{name}." if name else "")
            for attr in ("lora_A", "lora_B"):
                linear = getattr(layer, attr)
                value = tensors[f"{prefix}{attr}.weight"].to(dtype=linear.weight.dtype)
                if linear.weight.is_meta:
                    linear.weight = nn.Parameter(value, requires_grad=linear.weight.requires_grad)
                else:
                    linear.weight.copy_(value)
    mark_only_lora_trainable(model)
    return model
