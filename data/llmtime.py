"""LLMTIME text encoding of multivariate series: "0.92,0.74;0.56,0.77;0.34,0.70".

Conventions
    * Each variable is divided by its own scale (`Scaler`) and written with exactly `decimals` digits after the point
      (none and no point when decimals=0); negatives as "-0.25"; a value that rounds to zero is "0.00", never "-0.00".
    * The variables of one time step are joined with VAR_SEP ",", time steps with STEP_SEP ";"; no spaces and no
      trailing separator. A prompt is the encoded context plus STEP_SEP: the model continues with the next step.
    * Any number of variables (V >= 1) and either sign are supported, not only the two non-negative populations.

Leak-free scaling: the scale is fitted on the history only (the context a forecast may see). Fitting it on the whole
trajectory — the common mistake — leaks the future's magnitude into the prompt.

Scaling rule (`Scaler.fit`): each variable's 95th percentile of |history| is mapped to 1.0. Why:
    * A forecast stays below 10, i.e. one integer digit, unless it exceeds 10x the history's typical high level. On
      the coursework file (context = first 50 of 100 steps) the target's maximum is at most 2.25x the context's 95th
      percentile (median 0.93x), so there is more than 4x headroom; with 2 decimals every value then costs the same
      tokens ("d.dd") and the forecast grammar's integer-digit limit is never reached.
    * A percentile rather than the maximum, so one spike in the history does not squash the rest towards 0.
    * 2 decimals then resolve 1 % of that level: a rounding error of at most 0.5 % of it, far below forecast errors.
Larger values stay representable (more integer digits); they just cost more tokens.

Other scaling rules (`ScalingRule`, `scaling_rule(name)`; train.py and forecast.py --scaler, a plan's `scaler`), for
comparing with the coursework reports in ../shared/seeds, each fitted on the history only like the default:
    * "p95" (the default): the rule above, one scale per variable.
    * "joint-p95x10" (seeds 000, 004): one alpha for all variables = max over the variables of the 95th percentile
      of |history| / 10; every value is divided by alpha, so the larger variable's level reads 10.
    * "p99x10" (seed 002): per variable x * 10 / P99(|history|), i.e. a scale of P99 / 10.
    * "fixed=<alpha>" (seeds 001, 003): every value divided by the same alpha (seed 003's x / 5 * 10 is fixed=0.5).
Percentiles are numpy's default (linear interpolation between order statistics), as the seeds computed them; they
are taken of |history|, which for populations (never negative) is the history itself.

`python -m data.llmtime encode --scaler NAME --prey V... --predator V... [--decimals D] [--tokenizer DIR]` prints
the scale factor(s), the text and its token ids: a seed report's worked example can be put beside it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

STEP_SEP = ";"
VAR_SEP = ","
DEFAULT_PERCENTILE = 95.0
# A history whose percentile level is at or below this is treated as all zeros (no division by ~0).
ZERO_LEVEL = 1e-12


@dataclass
class Scaler:
    """Per-variable divisors: text value = original value / scale."""
    scale: np.ndarray  # (V,) > 0

    def __post_init__(self):
        self.scale = np.asarray(self.scale, dtype=np.float64).reshape(-1)
        if self.scale.size == 0 or not (np.isfinite(self.scale).all() and (self.scale > 0).all()):
            raise ValueError(f"scaler scales must be finite and > 0, one per variable (at least one), "
                             f"got {self.scale.tolist()}")

    @classmethod
    def fit(cls, history: np.ndarray, percentile: float = DEFAULT_PERCENTILE) -> Scaler:
        """Map each variable's `percentile` of |history| to 1.0 (history: (T, V) or (T,); see the module docstring).

        Pass the history only — never steps that are to be forecast. A variable whose history is all zeros gets
        scale 1.0; one whose percentile level is ~0 but not its maximum (mostly zeros, a few spikes) gets its max."""
        level = percentile_levels(history, percentile)
        return cls(np.where(level > ZERO_LEVEL, level, 1.0))

    @staticmethod
    def below_zero_level(history: np.ndarray) -> np.ndarray:
        """(V,) bool: the variables whose history is not all zeros but at most ZERO_LEVEL in size, which `fit`
        treats as all zeros (scale 1.0): their text shows only zeros, so a forecast of them says nothing."""
        history = np.asarray(history, dtype=np.float64)
        top = np.abs(history.reshape(len(history), -1)).max(axis=0)
        return (top > 0) & (top <= ZERO_LEVEL)

    @classmethod
    def fixed(cls, value: float, n_vars: int) -> Scaler:
        """The same divisor for every variable (1.0: the text shows the original values)."""
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
    def from_dict(cls, d: dict) -> Scaler:
        return cls(np.asarray(d["scale"]))


def percentile_levels(history: np.ndarray, percentile: float, what: str = "Scaler.fit") -> np.ndarray:
    """(V,): each variable's `percentile` of |history| (numpy's linear interpolation), or its maximum where that
    percentile is ~0 (ZERO_LEVEL) but the maximum is not; 0 for an all-zero variable. `what` names the caller in
    the errors (a history that is empty, not (T, V) or (T,), or not finite)."""
    history = np.asarray(history, dtype=np.float64)
    if history.ndim == 1:
        history = history[:, None]
    if history.ndim != 2 or history.shape[0] == 0 or history.shape[1] == 0:
        raise ValueError(f"{what} needs a (T, V) history with T, V >= 1, got shape {history.shape}")
    if not np.isfinite(history).all():
        step, var = np.argwhere(~np.isfinite(history))[0]
        raise ValueError(f"{what}: history[{step}, {var}] is {history[step, var]}; the history must be finite")
    if not 0 < percentile <= 100:
        raise ValueError(f"{what}: percentile must be in (0, 100], got {percentile}")
    magnitude = np.abs(history)
    level = np.percentile(magnitude, percentile, axis=0)
    return np.where(level > ZERO_LEVEL, level, magnitude.max(axis=0))


# ---- scaling rules -------------------------------------------------------------------------------------------------

DEFAULT_SCALER = "p95"
SCALER_KINDS = ("p95", "joint-p95x10", "p99x10", "fixed")
SCALER_CHOICES = "p95, joint-p95x10, p99x10 or fixed=<alpha> (alpha > 0, e.g. fixed=0.5)"


class ScalerNameError(ValueError):
    """A --scaler / `scaler` value that names no scaling rule (or a fixed alpha that is not a number > 0)."""


def _short(value: float) -> str:
    """A float as short as it reads back exactly: 0.5, 5, 1e-07, 0.123456789."""
    text = f"{value:g}"
    return text if float(text) == value else repr(value)


@dataclass(frozen=True)
class ScalingRule:
    """How a trajectory's Scaler is fitted on its history (the context a forecast may see, never what it forecasts):
    the rules of the module docstring. `name` is the canonical text (`scaling_rule(rule.name) == rule`)."""
    kind: str  # one of SCALER_KINDS
    alpha: float | None = None  # fixed's divisor

    @property
    def name(self) -> str:
        return f"fixed={_short(self.alpha)}" if self.kind == "fixed" else self.kind

    @property
    def joint(self) -> bool:
        """One divisor for all variables (alpha), rather than one per variable."""
        return self.kind in ("joint-p95x10", "fixed")

    def fit(self, history: np.ndarray) -> Scaler:
        """The Scaler of a (T, V) (or (T,)) history under this rule (a variable or a history that is all zeros, or
        within ZERO_LEVEL of it, gets the divisor 1.0: its text shows the values as they are)."""
        if self.kind == "p95":
            return Scaler.fit(history)
        levels = percentile_levels(history, 99.0 if self.kind == "p99x10" else 95.0, f"scaler {self.name}")
        if self.kind == "fixed":
            return Scaler.fixed(self.alpha, len(levels))
        if self.kind == "p99x10":
            return Scaler(np.where(levels > ZERO_LEVEL, levels / 10, 1.0))
        top = levels.max()  # joint-p95x10
        return Scaler.fixed(top / 10 if top > ZERO_LEVEL else 1.0, len(levels))

    def describe(self) -> str:
        """What the rule does, in a phrase for metrics.json's protocol and the report."""
        return {"p95": "each species divided by the 95th percentile of its |context|",
                "joint-p95x10": "both species divided by one alpha = max over the species of the 95th percentile of "
                                "|context| / 10 (seeds 000, 004)",
                "p99x10": "each species divided by the 99th percentile of its |context| / 10 (seed 002)",
                "fixed": f"every value divided by {_short(self.alpha or 0.0)}"}[self.kind]


def scaling_rule(name) -> ScalingRule:
    """The ScalingRule `name` names (a ScalingRule is returned as it is); ScalerNameError, one line naming the value,
    for anything else: an unknown name, fixed= without a finite number > 0."""
    if isinstance(name, ScalingRule):
        return name
    if not isinstance(name, str):
        raise ScalerNameError(f"scaler must be a string naming a rule ({SCALER_CHOICES}), got {name!r}")
    text = name.strip()
    if text.startswith("fixed="):
        value = text[len("fixed="):]
        try:
            alpha = float(value)
        except ValueError:
            raise ScalerNameError(f"scaler {name!r}: alpha must be a number > 0, e.g. fixed=0.5, got {value!r}") \
                from None
        if not (np.isfinite(alpha) and alpha > 0):
            raise ScalerNameError(f"scaler {name!r}: alpha must be a finite number > 0, got {value}")
        return ScalingRule("fixed", alpha)
    if text in SCALER_KINDS and text != "fixed":
        return ScalingRule(text)
    raise ScalerNameError(f"unknown scaler {name!r}: choose {SCALER_CHOICES}")


def format_number(value: float, decimals: int) -> str:
    text = f"{value:.{decimals}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # never "-0.00"


def encode(values: np.ndarray, scaler: Scaler, decimals: int = 2) -> str:
    """(T, V) values in original units (or (T,) for one variable) -> LLMTIME text."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    # Check before scaling: a (T, 1) array would otherwise broadcast against V scales and be encoded V times.
    if values.ndim != 2 or values.shape[1] != scaler.n_vars:
        raise ValueError(f"encode: values have shape {values.shape} but the scaler expects (T, {scaler.n_vars})")
    if int(decimals) != decimals or decimals < 0:
        raise ValueError(f"encode: decimals must be a whole number >= 0, got {decimals!r}")
    if not np.isfinite(values).all():
        step, var = np.argwhere(~np.isfinite(values))[0]
        raise ValueError(f"encode: values[{step}, {var}] is {values[step, var]}; only finite values can be encoded")
    scaled = scaler.transform(values)
    return STEP_SEP.join(VAR_SEP.join(format_number(v, int(decimals)) for v in row) for row in scaled)


def format_prompt(context: np.ndarray, scaler: Scaler, decimals: int = 2) -> str:
    """The text a model continues to forecast the step after `context`: encode(context) + STEP_SEP."""
    return encode(context, scaler, decimals) + STEP_SEP


@dataclass
class ParseReport:
    """How `decode` fared. Steps are the STEP_SEP-separated segments of the text (a trailing separator ends the
    text rather than opening an empty step). A malformed step is any segment that is not exactly `n_vars` numbers
    joined by VAR_SEP (in the expected decimals) with finite values; a cut-off last step is malformed too."""
    n_steps: int  # well-formed steps kept: the valid prefix, up to the first malformed step
    n_bad: int  # malformed steps anywhere in the text (well-formed steps after the first bad one are dropped, not bad)
    first_bad_pos: int | None  # character offset where the first malformed step starts; None when there is none
    truncated: bool  # the text ends inside a step that could still have become well formed (e.g. "0.92,0.7")

    @property
    def ok(self) -> bool:
        return self.n_bad == 0


def decode(text: str, scaler: Scaler, n_vars: int | None = None,
           decimals: int | None = None) -> tuple[np.ndarray, ParseReport]:
    """LLMTIME text -> ((steps, V) values in original units, report). Never raises on model output: any string
    (or even a non-string, read as "") gives the valid prefix and a report.

    Parsing keeps the steps before the first malformed one, because once a step is broken the values after it can
    no longer be placed in time with certainty (a lost separator shifts everything). Malformed steps after the first
    are still counted in `n_bad`, so the count reflects how noisy the whole text was.

    `n_vars` (default: the scaler's) must match the scaler — a mismatch is the caller's error and raises ValueError.
    `decimals` None accepts any number of decimals, including an integer without a point."""
    n_vars = scaler.n_vars if n_vars is None else n_vars
    if n_vars != scaler.n_vars:
        raise ValueError(f"decode: n_vars={n_vars} but the scaler has {scaler.n_vars} variables")
    number = number_pattern(decimals)
    step_pattern = re.compile(rf"{number}(?:{re.escape(VAR_SEP)}{number}){{{n_vars - 1}}}")
    text = text if isinstance(text, str) else ""
    segments = text.split(STEP_SEP)
    if segments[-1] == "":
        segments.pop()  # a trailing separator (or the empty text) adds no step
    rows, n_bad, first_bad, pos = [], 0, None, 0
    for segment in segments:
        values = _parse_step(segment, step_pattern, scaler)
        if values is None:
            n_bad += 1
            first_bad = pos if first_bad is None else first_bad
        elif first_bad is None:
            rows.append(values)
        pos += len(segment) + len(STEP_SEP)
    # Only text that stops without a closing separator can have been cut off inside a step.
    truncated = (bool(segments) and not text.endswith(STEP_SEP) and step_pattern.fullmatch(segments[-1]) is None
                 and _could_continue(segments[-1], number, decimals, n_vars))
    values = np.asarray(rows, dtype=np.float64).reshape(len(rows), n_vars)
    return values, ParseReport(len(rows), n_bad, first_bad, truncated)


def _parse_step(segment: str, step_pattern: re.Pattern, scaler: Scaler) -> np.ndarray | None:
    """One step's values in original units, or None if the segment is malformed (including values so long that
    they overflow to infinity)."""
    if step_pattern.fullmatch(segment) is None:
        return None
    with np.errstate(over="ignore"):
        values = scaler.inverse(np.array([float(v) for v in segment.split(VAR_SEP)]))
    return values if np.isfinite(values).all() else None


def number_pattern(decimals: int | None) -> str:
    """Regex of one encoded number: exactly `decimals` digits after the point (None: any, or no point). ASCII digits
    only: Python's float() would also accept other scripts' digits, which no encoder writes."""
    if decimals is None:
        return r"-?[0-9]+(?:\.[0-9]+)?"
    return r"-?[0-9]+" if decimals == 0 else r"-?[0-9]+\.[0-9]{" + str(decimals) + "}"


def _could_continue(segment: str, number: str, decimals: int | None, n_vars: int) -> bool:
    """Is `segment` a proper prefix of a well-formed step (text cut off mid-step)?"""
    parts = segment.split(VAR_SEP)
    if len(parts) > n_vars:
        return False
    if decimals is None:
        partial = r"-?(?:[0-9]+(?:\.[0-9]*)?)?"
    elif decimals == 0:
        partial = r"-?[0-9]*"
    else:
        partial = r"-?(?:[0-9]+(?:\.[0-9]{0," + str(decimals) + "})?)?"
    complete = re.compile(number)
    return (all(complete.fullmatch(p) for p in parts[:-1])
            and re.fullmatch(partial, parts[-1]) is not None)


# ---- python -m data.llmtime encode ---------------------------------------------------------------------------------

ENCODE_DESCRIPTION = """\
Encode one trajectory as LLMTIME text under a scaling rule, the way train.py and forecast.py write it: the scale
factor(s) the rule fits on the values given (all of them are the history here), the text on a line of its own, and,
with --tokenizer, its token ids. Put it beside a seed report's worked example:

    python -m data.llmtime encode --scaler joint-p95x10 --prey 2.9 3.2 3.8 4.5 5.1 --predator 1.1 0.9 0.7 0.6 0.5
    python -m data.llmtime encode --scaler fixed=0.5 --decimals 3 --prey 1.1335121 0.55542254 \\
        --predator 1.1031258 1.2579137 --tokenizer DIR    # DIR: a directory holding Qwen2.5's tokenizer.json

Exit status: 0 done, 2 bad arguments (an unknown scaler, a fixed alpha that is not a number > 0, prey and predator
of different lengths, a value that is not finite, a tokenizer directory that cannot be read)."""


def scale_line(rule: ScalingRule, scaler: Scaler, names=("prey", "predator")) -> str:
    """"scaler joint-p95x10: alpha 0.498 (...)" or "scaler p95: scale prey 4.98, predator 1.06 (...)"."""
    if rule.joint:
        return f"scaler {rule.name}: alpha {scaler.scale[0]:.6g} (every value divided by it)"
    scales = ", ".join(f"{name} {value:.6g}" for name, value in zip(names, scaler.scale))
    return f"scaler {rule.name}: scale {scales} (each value divided by its species' scale)"


def main(argv=None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m data.llmtime", description=ENCODE_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("encode", help="print a trajectory's scale, LLMTIME text and token ids",
                            description=ENCODE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scaler", default=DEFAULT_SCALER, help=f"{SCALER_CHOICES} (default: %(default)s)")
    p.add_argument("--decimals", type=int, default=2, help="digits after the point (default: %(default)s)")
    p.add_argument("--prey", type=float, nargs="+", required=True, metavar="V", help="prey values, in time order")
    p.add_argument("--predator", type=float, nargs="+", required=True, metavar="V",
                   help="predator values, as many as --prey")
    p.add_argument("--tokenizer", metavar="DIR", help="a directory with tokenizer.json (e.g. Qwen2.5's): also print "
                                                      "the token ids")
    args = parser.parse_args(argv)
    try:
        rule = scaling_rule(args.scaler)
        if len(args.prey) != len(args.predator):
            raise ValueError(f"--prey has {len(args.prey)} values and --predator {len(args.predator)}: give one "
                             "predator value per prey value")
        if args.decimals < 0:
            raise ValueError(f"--decimals must be >= 0, got {args.decimals}")
        values = np.stack([args.prey, args.predator], axis=1)
        if not np.isfinite(values).all():
            step, var = np.argwhere(~np.isfinite(values))[0]
            raise ValueError(f"--{('prey', 'predator')[var]} value {step + 1} is {values[step, var]}: only finite "
                             "values can be encoded")
        scaler = rule.fit(values)
        text = encode(values, scaler, args.decimals)
        ids = None
        if args.tokenizer is not None:
            from pathlib import Path

            from qwen_mini.tokenizer import Tokenizer

            if not (Path(args.tokenizer) / "tokenizer.json").is_file():
                raise ValueError(f"--tokenizer {args.tokenizer}: no tokenizer.json there (give the directory that "
                                 "holds it)")
            ids = Tokenizer.from_pretrained(args.tokenizer).encode(text)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(scale_line(rule, scaler))
    print(text)
    if ids is not None:
        print(f"token ids ({len(ids)}): {ids}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
