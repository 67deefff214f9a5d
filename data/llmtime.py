"""LLMTIME text encoding of multivariate series: "0.92,0.74;0.56,0.77;0.34,0.70".

Each variable is divided by its own scale, rounded to a fixed number of decimals; the variables of one time step
are joined with "," and time steps with ";", no spaces, no trailing separator.

The scale is fitted on the history only (the context a forecast may see): fitting it on the whole trajectory
would leak the future's magnitude into the prompt.

Scaling rule (`Scaler.fit`): each variable's 95th percentile of |history| is mapped to 1.0. About 95 % of the
history lands in [0, 1] and a forecast can grow to 9.99 x that level before needing a second integer digit, so
with 2 decimals nearly every value costs the same 4 tokens ("d.dd"), while still resolving 1 % of the typical
level. Larger values stay representable (more integer digits), they just cost more tokens.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

STEP_SEP = ";"
VAR_SEP = ","
DEFAULT_PERCENTILE = 95.0


@dataclass
class Scaler:
    scale: np.ndarray  # (V,) per-variable divisor, > 0

    def __post_init__(self):
        self.scale = np.asarray(self.scale, dtype=np.float64).reshape(-1)
        if not (np.isfinite(self.scale).all() and (self.scale > 0).all()):
            raise ValueError(f"scaler scales must be finite and > 0, got {self.scale.tolist()}")

    @classmethod
    def fit(cls, history: np.ndarray, percentile: float = DEFAULT_PERCENTILE) -> "Scaler":
        """Map each variable's `percentile` of |history| to 1.0 (history: (T, V) or (T,))."""
        history = np.abs(np.asarray(history, dtype=np.float64))
        if history.ndim == 1:
            history = history[:, None]
        if history.ndim != 2 or history.shape[0] == 0:
            raise ValueError(f"Scaler.fit needs a (T, V) history with T >= 1, got shape {history.shape}")
        level = np.percentile(history, percentile, axis=0)
        # An all-zero (or nearly so) history must not divide by zero: fall back to its max, then to 1.
        level = np.where(level > 1e-12, level, history.max(axis=0))
        return cls(np.where(level > 1e-12, level, 1.0))

    @classmethod
    def fixed(cls, value: float, n_vars: int) -> "Scaler":
        return cls(np.full(n_vars, float(value)))

    @property
    def n_vars(self) -> int:
        return len(self.scale)

    def transform(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float64) / self.scale

    def inverse(self, scaled: np.ndarray) -> np.ndarray:
        return np.asarray(scaled, dtype=np.float64) * self.scale

    def to_dict(self) -> dict:
        return {"scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Scaler":
        return cls(np.asarray(d["scale"]))


def _as_2d(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[:, None] if values.ndim == 1 else values


def format_number(value: float, decimals: int) -> str:
    text = f"{value:.{decimals}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # never "-0.00"


def encode(values: np.ndarray, scaler: Scaler, decimals: int = 2) -> str:
    """(T, V) values in original units -> LLMTIME text."""
    scaled = scaler.transform(_as_2d(values))
    if scaled.shape[1] != scaler.n_vars:
        raise ValueError(f"values have {scaled.shape[1]} variables but the scaler was fitted on {scaler.n_vars}")
    if not np.isfinite(scaled).all():
        raise ValueError("cannot encode NaN or infinite values")
    return STEP_SEP.join(VAR_SEP.join(format_number(v, decimals) for v in row) for row in scaled)


def format_prompt(context: np.ndarray, scaler: Scaler, decimals: int = 2) -> str:
    """The text a model continues to forecast the step after `context`."""
    return encode(context, scaler, decimals) + STEP_SEP


@dataclass
class ParseReport:
    n_steps: int  # well-formed steps in the valid prefix
    n_bad: int  # malformed steps (anywhere in the text; a truncated last step counts too)
    first_bad_pos: int | None  # character offset where the first malformed step starts
    truncated: bool  # the text ends inside a step that was still well-formed so far

    @property
    def ok(self) -> bool:
        return self.n_bad == 0


def decode(text: str, scaler: Scaler, n_vars: int | None = None,
           decimals: int | None = None) -> tuple[np.ndarray, ParseReport]:
    """LLMTIME text -> ((steps, V) values in original units, report). Never raises on any string.

    The valid prefix is kept: parsing stops at the first malformed step, because values after a broken step can no
    longer be placed in time with certainty; every malformed step in the text is still counted. `n_vars` defaults
    to the scaler's; `decimals` None accepts any number of decimals (including none)."""
    n_vars = scaler.n_vars if n_vars is None else n_vars
    if n_vars != scaler.n_vars:  # a caller's mistake, not model output
        raise ValueError(f"decode: n_vars={n_vars} but the scaler has {scaler.n_vars} variables")
    number = number_pattern(decimals)
    step_pattern = re.compile(rf"{number}(?:{re.escape(VAR_SEP)}{number}){{{n_vars - 1}}}")
    text = text if isinstance(text, str) else ""
    rows, n_bad, first_bad, truncated, prefix_open = [], 0, None, False, True
    pos = 0
    segments = text.split(STEP_SEP)
    for i, segment in enumerate(segments):
        is_last = i == len(segments) - 1
        if segment == "" and is_last:
            break  # trailing separator (or empty text)
        good = step_pattern.fullmatch(segment) is not None
        if good and prefix_open:
            rows.append([float(v) for v in segment.split(VAR_SEP)])
        elif not good:
            n_bad += 1
            if first_bad is None:
                first_bad = pos
                truncated = is_last and _could_continue(segment, number, n_vars)
            prefix_open = False
        pos += len(segment) + len(STEP_SEP)
    values = np.asarray(rows, dtype=np.float64).reshape(len(rows), n_vars)
    return scaler.inverse(values), ParseReport(len(rows), n_bad, first_bad, truncated)


def number_pattern(decimals: int | None) -> str:
    """Regex of one encoded number: exactly `decimals` digits after the point (None: any, or no point)."""
    if decimals is None:
        return r"-?\d+(?:\.\d+)?"
    return r"-?\d+" if decimals == 0 else r"-?\d+\.\d{%d}" % decimals


def _could_continue(segment: str, number: str, n_vars: int) -> bool:
    """Is `segment` a proper prefix of a well-formed step (text cut off mid-step)?"""
    parts = segment.split(VAR_SEP)
    if len(parts) > n_vars:
        return False
    whole = re.compile(number)
    partial = re.compile(r"-?(\d+(\.\d*)?)?")
    return all(whole.fullmatch(p) for p in parts[:-1]) and partial.fullmatch(parts[-1]) is not None
