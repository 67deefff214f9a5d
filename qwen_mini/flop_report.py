"""What a FLOP count reports, and how FLOP numbers are written.

`FlopRow` is one operation's forward FLOPs, `FlopReport` a count's rows with their sums (per layer, per component,
per training step) as a text table and as JSON. Backward is `BACKWARD_FACTOR` x forward for every row, by the users'
convention. `format_flops` and `log10` write FLOP numbers the way the users do; the ledger, the report and the CLIs
use these two. `FlopCountError` is the error of every counting step (`qwen_mini.flops` counts; this module, at the
bottom of the import order, only reports).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["BACKWARD_FACTOR", "FlopCountError", "FlopReport", "FlopRow", "format_flops", "log10"]

BACKWARD_FACTOR = 2  # backward pass = 2 x forward pass, for every counted operation


class FlopCountError(ValueError):
    """A model, setting or cost table that cannot be counted."""


@dataclass(frozen=True)
class FlopRow:
    """Forward FLOPs of one operation. `layer` groups rows for the per-layer table ("layers.3", "lm_head", "loss"),
    `component` names the operation inside it ("self_attn.q_proj.matmul"), `module` is the path of the module that
    reported it in `model.named_modules()` ("model.layers.3.self_attn.q_proj")."""
    layer: str
    component: str
    forward: int
    module: str = ""

    @property
    def backward(self) -> int:
        return BACKWARD_FACTOR * self.forward

    @property
    def total(self) -> int:
        """Forward + backward: this row's share of a training step."""
        return self.forward + self.backward


def format_flops(value: int | float, digits: int = 3) -> str:
    """Compact scientific notation as the users write it: 3.1e16, 1.11e17, 8.0e16; small values in full."""
    if abs(value) < 10_000:
        return f"{value:,}" if isinstance(value, int) else f"{value:g}"
    mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
    mantissa = mantissa.rstrip("0")
    if mantissa.endswith("."):
        mantissa += "0"
    return f"{mantissa}e{int(exponent)}"


def log10(value: int) -> float:
    """log10 of a FLOP count, as the users report them (-inf for zero)."""
    return math.log10(value) if value > 0 else float("-inf")


@dataclass
class FlopReport:
    """FLOPs of one training step of `batch` sequences of `seq` tokens, row by row."""
    rows: list[FlopRow]
    batch: int
    seq: int
    gqa: str
    costs: dict[str, int]
    include_loss: bool
    model_name: str = ""

    @property
    def forward(self) -> int:
        return sum(row.forward for row in self.rows)

    @property
    def backward(self) -> int:
        return BACKWARD_FACTOR * self.forward

    @property
    def step(self) -> int:
        """One training step: forward + backward."""
        return self.forward + self.backward

    def by_layer(self) -> dict[str, int]:
        """Forward FLOPs per layer group, in model order."""
        return self._group(lambda row: row.layer)

    def by_component(self) -> dict[str, int]:
        """Forward FLOPs per component summed over the decoder layers ("self_attn.scores" over all layers)."""
        return self._group(lambda row: row.component if row.layer.startswith("layers.")
                           else f"{row.layer}.{row.component}")

    def _group(self, key: Callable[[FlopRow], str]) -> dict[str, int]:
        groups: dict[str, int] = {}
        for row in self.rows:
            groups[key(row)] = groups.get(key(row), 0) + row.forward
        return groups

    def select(self, predicate: Callable[[FlopRow], bool]) -> int:
        """Forward FLOPs of the rows that match, e.g. `report.select(lambda r: r.component.endswith("bias"))`."""
        return sum(row.forward for row in self.rows if predicate(row))

    def gqa_description(self) -> str:
        return ("real grouped-query attention (k/v projections to the model's key/value heads)" if self.gqa == "real"
                else "counted as multi-head attention (k/v projections as wide as the query heads)")

    def to_dict(self) -> dict:
        def entry(forward: int) -> dict:
            return {"forward": forward, "backward": BACKWARD_FACTOR * forward,
                    "total": (1 + BACKWARD_FACTOR) * forward}
        return {
            "model": self.model_name,
            "batch": self.batch,
            "seq": self.seq,
            "tokens": self.batch * self.seq,
            "gqa": self.gqa,
            "include_loss": self.include_loss,
            "costs": dict(self.costs),
            "backward_factor": BACKWARD_FACTOR,
            "forward": self.forward,
            "backward": self.backward,
            "step": self.step,
            "log10_step": log10(self.step),
            "layers": [{"layer": name, **entry(forward)} for name, forward in self.by_layer().items()],
            "rows": [{"layer": r.layer, "component": r.component, "module": r.module, **entry(r.forward)}
                     for r in self.rows],
        }

    def table(self, by: str = "layer") -> str:
        """Text table with forward, backward, per-step and share-of-step columns, then the totals.

        by="layer": one row per decoder layer (plus embedding, rotary tables, final norm, LM head, loss);
        by="component": one row per operation, summed over the decoder layers."""
        if by == "layer":
            groups, label = self.by_layer(), "layer"
        elif by == "component":
            groups, label = self.by_component(), "component (all layers)"
        else:
            raise FlopCountError(f"table(by={by!r}): choose 'layer' or 'component'")
        step = self.step or 1
        width = max(len(label), *(len(name) for name in groups), len("total"))
        header = f"{label:<{width}}  {'forward':>11}  {'backward':>11}  {'per step':>11}  {'share':>7}"
        lines = [
            f"FLOPs of one training step{f' of {self.model_name}' if self.model_name else ''}: batch {self.batch} x "
            f"ctx {self.seq} = {self.batch * self.seq:,} tokens",
            f"attention: gqa={self.gqa}, {self.gqa_description()}; backward = {BACKWARD_FACTOR} x forward"
            + ("" if self.include_loss else "; no loss (plain forward)"),
            "",
            header,
            "-" * len(header),
        ]
        for name, forward in groups.items():
            total = (1 + BACKWARD_FACTOR) * forward
            lines.append(f"{name:<{width}}  {format_flops(forward, 4):>11}  "
                         f"{format_flops(BACKWARD_FACTOR * forward, 4):>11}  {format_flops(total, 4):>11}  "
                         f"{100 * total / step:>6.2f}%")
        lines.append("-" * len(header))
        lines.append(f"{'total':<{width}}  {format_flops(self.forward, 4):>11}  {format_flops(self.backward, 4):>11}"
                     f"  {format_flops(self.step, 4):>11}  {100.0:>6.2f}%")
        lines.append("")
        lines.append(f"forward  {self.forward:,} FLOPs")
        lines.append(f"backward {self.backward:,} FLOPs")
        lines.append(f"per step {self.step:,} FLOPs (log10 {log10(self.step):.3f})")
        return "\n".join(lines)
