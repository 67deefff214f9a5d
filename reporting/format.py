"""How the report writes its numbers: one function per kind of number, used by the tables and by the Findings and
Conclusions alike, so a number stated in the text is printed exactly as the table beside it prints it (what a marker
checks, and what tests/test_report_study.py's parser checks)."""
from __future__ import annotations

import math
from pathlib import Path

RATIO_FROM = 2.0  # a relative change of +100 % or more reads as a ratio: "x88.7", not "+8773.7 %"
TINY_RATIO = 0.01  # a change below -99 % too ("x0.0084"): "-100.0 %" would hide how far it fell


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def loss(value) -> str:
    """A validation loss (nats/token): 4 decimals; "-" for none, "NaN" / "inf" for a non-finite one, 4 significant
    digits where 4 decimals would say too little or far too much (a hostile -1e308)."""
    if value is None:
        return "-"
    if not finite(value):
        return "NaN" if isinstance(value, float) and math.isnan(value) else ("inf" if value > 0 else "-inf")
    return f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.4g}"


def delta(value) -> str:
    """A signed difference of two losses or of R²: 4 significant digits."""
    if value is None:
        return "-"
    return f"{value:+.4g}" if finite(value) else loss(value)


def number(value) -> str:
    """A score (MSE, MAE, ...): 4 significant digits."""
    if value is None or not finite(value):
        return "-" if value is None or math.isnan(value) else loss(value)
    return f"{value:.4g}"


def ratio(value: float) -> str:
    """new / old as a factor: 3 significant digits, never in exponent form below 10^4."""
    return f"x{value:.3g}" if value < 1000 else f"x{value:.0f}" if value < 1e4 else f"x{value:.3g}"


def relative(new, old) -> str:
    """The change of a score against a reference: "-49.0 %", "+0.012 %" (a change that rounds to 0.0 % keeps two
    significant digits, so an unequal pair never reads as equal), "0 %" when equal, "x88.7" past +100 %, "-" where
    either is missing or the reference is 0."""
    if not (finite(new) and finite(old)) or old == 0:
        return "-"
    if new == old:
        return "0 %"
    factor = new / old
    if factor >= RATIO_FROM or 0 <= factor < TINY_RATIO:
        return ratio(factor)
    percent = 100 * (factor - 1)
    return f"{percent:+.1f} %" if abs(percent) >= 0.05 else f"{percent:+.2g} %"


def factor_text(factor: float) -> str:
    """A ratio new / old written the way `relative` writes the change it means (for interval bounds)."""
    return relative(factor, 1.0)


def share(flops: int, budget: int) -> str:
    return f"{100 * flops / budget:.3g} %" if budget else "-"


def setting(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def image(path: Path, out: Path, alt: str) -> str:
    return f"![{alt}]({path.relative_to(out).as_posix()})"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table (the callers keep it to at most 10 columns: printable)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |"
                                                                            for r in rows]
