"""Load official Qwen2/Qwen2.5 safetensors checkpoints (local directory or hub id) and save HF-format ones."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import QwenConfig
from .hub import resolve_dir
from .model import Qwen


class CheckpointError(ValueError):
    """A checkpoint whose files or tensors do not match the model its config describes."""


def from_pretrained(path_or_hub_id: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None) -> Qwen:
    """Build the model from `config.json` and load every tensor strictly.

    dtype None keeps the checkpoint's dtype (float32 if the files disagree).
    """
    root = resolve_dir(path_or_hub_id, ["*.json", "*.safetensors"])
    config = QwenConfig.from_hf(root / "config.json")
    tensors = read_safetensors(root)
    if dtype is None:
        dtypes = {t.dtype for t in tensors.values()}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    with torch.device("meta"):
        model = Qwen(config)
    expected = dict(model.state_dict())
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    check_state_dict(expected, tensors, root)
    check_finite(tensors, root)
    model.load_state_dict(tensors, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device=device, dtype=dtype).eval()


def check_state_dict(expected: dict, found: dict, where, error: type[Exception] = CheckpointError) -> None:
    """Strict name and shape check of `found` tensors against the `expected` ones; the first fault raises `error`
    naming the tensor and both shapes."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing:
        raise error(f"{where}: missing tensor {missing[0]!r} (expected shape {tuple(expected[missing[0]].shape)})"
                    + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if unexpected:
        raise error(f"{where}: unexpected tensor {unexpected[0]!r} with shape "
                    f"{tuple(found[unexpected[0]].shape)} (not part of this model)"
                    + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
    for key, ref in expected.items():
        if tuple(found[key].shape) != tuple(ref.shape):
            raise error(f"{where}: tensor {key!r} has shape {tuple(found[key].shape)} in the file "
                        f"but the model expects {tuple(ref.shape)}")


def check_finite(tensors: dict[str, torch.Tensor], where, error: type[Exception] = CheckpointError) -> None:
    """Refuse weights holding NaN or infinity, naming the first such tensor: a model with them computes nothing but
    NaN, and would do so silently (losses, forecasts and metrics all come out as numbers of a sort)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel() and not all_finite(tensor):
            bad = ~torch.isfinite(tensor)
            index = [int(i) for i in bad.nonzero()[0]]
            raise error(f"{where}: tensor {name!r} holds {int(bad.sum())} non-finite value(s) (e.g. "
                        f"{tensor[tuple(index)].item()} at {index}); the file is damaged or was saved from a run "
                        "that diverged")


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity in `tensor`: its minimum and maximum in one pass (both are NaN if any element is), without
    a temporary as large as the tensor."""
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def read_safetensors(root: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file or sharded (`model.safetensors.index.json`) checkpoint."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
    elif (root / "model.safetensors").is_file():
        files, weight_map = ["model.safetensors"], None
    else:
        raise CheckpointError(f"{root}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for name in files:
        file = root / name
        if not file.is_file():
            raise CheckpointError(f"{index}: shard {name!r} is listed but missing")
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    if weight_map is not None:
        stray = [k for k, shard in weight_map.items() if k not in tensors]
        if stray:
            raise CheckpointError(f"{index}: tensor {stray[0]!r} is mapped to {weight_map[stray[0]]!r} "
                                  f"but that shard does not contain it")
    return tensors


def save_pretrained(model: Qwen, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write HF-format `config.json` + `model.safetensors` (tied lm_head stored once, as HF does)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    config = model.config.to_hf()
    config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    # Written beside the target and renamed over it: a reader never sees half a weights file.
    weights, tmp = directory / "model.safetensors", directory / ".model.safetensors.tmp"
    try:
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, weights)
    finally:
        tmp.unlink(missing_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_model_and_tokenizer(spec: str | os.PathLike, dtype: torch.dtype | None = None,
                             device: str | torch.device | None = None, seed: int = 0):
    """(model, tokenizer) for a CLI's `--model`: the preset name "tiny" (random weights seeded by `seed`, the
    character tokenizer; for offline demos and tests), or a checkpoint directory / hub id holding the weights and
    tokenizer.json."""
    from .tokenizer import Tokenizer, char_tokenizer

    if str(spec) == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen(QwenConfig.from_name("tiny"))
        return model.to(device=device, dtype=dtype).eval(), char_tokenizer()
    return from_pretrained(spec, dtype=dtype, device=device), Tokenizer.from_pretrained(spec)
