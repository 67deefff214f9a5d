"""The LoRA layer and its injection into a `qwen_mini.Qwen`, in plain PyTorch.

`LoRALinear` wraps an existing `nn.Linear` and adds a trainable low-rank update; `inject` swaps it in for the chosen
projections of every layer (`check_targets` is the one check of which projections those may be). The base model's
code knows nothing about LoRA: it keeps calling `self.q_proj(x)`. Reading and writing adapter files is `lora.peft`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn

__all__ = ["VALID_TARGETS", "LoRALinear", "adaptable_paths", "adapters_to_float32", "check_targets", "inject",
           "lora_layers", "lora_state_dict", "mark_only_lora_trainable", "merge_all", "merge_and_unload",
           "trainable_parameters", "unmerge_all", "wrap"]

# The projections of a Qwen2 block that can carry an adapter (the last component of their module path).
VALID_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """`base_layer(x) + scaling * lora_B(lora_A(dropout(x)))` with `scaling = alpha / rank`.

    `base_layer` is the wrapped linear (frozen by `inject`); `lora_A` (rank x in, Kaiming-uniform like PEFT) and
    `lora_B` (out x rank, zeros) are bias-free linears, so a fresh adapter leaves the output unchanged. After `merge()`
    the update lives in `base_layer.weight` and forward skips the adapter; `unmerge()` takes it out again.
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        if isinstance(base_layer, LoRALinear):
            raise ValueError("this linear already carries a LoRA adapter (LoRALinear cannot wrap a LoRALinear)")
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base_layer).__name__}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        alpha = rank if alpha is None else alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"LoRA alpha must be a finite number, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be a probability in [0, 1), got {dropout!r}")
        self.base_layer = base_layer
        self.rank = rank
        self.alpha = alpha
        self.scaling = float(alpha) / rank
        w = base_layer.weight
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A ~ kaiming_uniform(a=sqrt(5)), B = 0 (the adapter starts as the identity)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    # The wrapped linear's attributes, so code that reads `proj.weight` / `proj.in_features` keeps working.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        # The adapter may be kept in a wider dtype than the base (e.g. float32 adapter on a bfloat16 model).
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return result + (update * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A (out x in), computed in float32 and returned in the base weight's dtype."""
        w = self.base_layer.weight
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return delta.to(w.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into `base_layer.weight` (no-op if already merged)."""
        if not self.merged:
            self.base_layer.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter back out of `base_layer.weight` (no-op if not merged)."""
        if self.merged:
            self.base_layer.weight.sub_(self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


# ---- injection and helpers -----------------------------------------------------------------------------------------

def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(module path, layer) for every LoRALinear in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def check_targets(targets: Iterable[str] | str, error: type[Exception] = ValueError) -> tuple[str, ...]:
    """The projections `targets` names, each once, in the order given: the one check of LoRA targets (for `inject`,
    a training config, a --targets flag). An empty or unknown target raises `error` naming the valid ones."""
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if not targets:
        raise error(f"no LoRA targets given; valid targets: {', '.join(VALID_TARGETS)}")
    unknown = [t for t in targets if t not in VALID_TARGETS]
    if unknown:
        raise error(f"unknown LoRA target(s) {', '.join(unknown)} in {list(targets)}; valid targets: "
                    f"{', '.join(VALID_TARGETS)}")
    return tuple(dict.fromkeys(targets))


def adaptable_paths(model: nn.Module) -> list[str]:
    """Paths of the linears (or already wrapped linears) that can carry an adapter, in module order."""
    return [name for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] in VALID_TARGETS and isinstance(module, (nn.Linear, LoRALinear))]


def wrap(model: nn.Module, paths: list[str], rank: int, alpha, dropout: float) -> None:
    """Put a LoRALinear (rank, alpha, dropout) around each linear at `paths`, none of them adapted yet."""
    if not paths:
        raise ValueError("no module to put LoRA on: the model has no linear named "
                         f"{' / '.join(VALID_TARGETS)} matching the targets")
    wrapped = [p for p in paths if isinstance(model.get_submodule(p), LoRALinear)]
    if wrapped:
        raise ValueError(f"{wrapped[0]} already carries a LoRA adapter" +
                         (f" (and {len(wrapped) - 1} more)" if len(wrapped) > 1 else ""))
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))


def inject(model: nn.Module, rank: int, alpha: float | None = None,
           targets: Iterable[str] = ("q_proj", "v_proj"), dropout: float = 0.0) -> int:
    """Wrap the `targets` projections of every layer in a LoRALinear and freeze every other parameter.

    Works on models on any device, including "meta". Returns the number of trainable parameters.
    """
    targets = check_targets(targets)
    paths = [p for p in adaptable_paths(model) if p.rsplit(".", 1)[-1] in targets]
    wrap(model, paths, rank, alpha, dropout)
    return mark_only_lora_trainable(model)


def mark_only_lora_trainable(model: nn.Module) -> int:
    """requires_grad on the adapters' A and B matrices only; returns the trainable parameter count."""
    model.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(True)
    return sum(p.numel() for p in trainable_parameters(model))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with requires_grad (each once, even if tied): what the optimizer should get."""
    return [p for p in model.parameters() if p.requires_grad]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, under the model's own names (`model.layers.0.self_attn.q_proj.lora_A.weight`)."""
    state = {}
    for name, layer in lora_layers(model):
        prefix = f"{name}." if name else ""
        state[f"{prefix}lora_A.weight"] = layer.lora_A.weight.detach()
        state[f"{prefix}lora_B.weight"] = layer.lora_B.weight.detach()
    return state


def adapters_to_float32(model: nn.Module) -> int:
    """Keep every adapter's A and B in float32 whatever the base's dtype (a bf16 base trains float32 adapters and
    AdamW state under autocast). Returns the number of adapted layers."""
    layers = list(lora_layers(model))
    for _, layer in layers:
        layer.lora_A.float()
        layer.lora_B.float()
    return len(layers)


def merge_all(model: nn.Module) -> int:
    """Merge every adapter into its base weight; returns the number of LoRA layers."""
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_all(model: nn.Module) -> int:
    """Undo `merge_all`; returns the number of LoRA layers."""
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.unmerge()
    return len(layers)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain linears back (in place), e.g. before `qwen_mini.save_pretrained`.

    The result has exactly the base model's module tree and state-dict names; its parameters stay frozen."""
    for name, layer in list(lora_layers(model)):
        layer.merge()
        parent_path, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, layer.base_layer)
    return model
