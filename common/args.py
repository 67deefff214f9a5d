"""Number types for the command lines (train.py, forecast.py, flops.py, bench): one place for bounds and messages."""
from __future__ import annotations

import argparse
import math
from decimal import Decimal, InvalidOperation


def bounded(kind, low, high=None, low_open=False):
    """argparse type: a finite `kind` (int or float) number >= low (> low if low_open) and <= high."""
    noun = "an integer" if kind is int else "a number"
    wanted = f"{noun} {'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if (not math.isfinite(value) or value < low or (low_open and value == low)
                or (high is not None and value > high)):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value
    return parse


positive_int, non_negative_int = bounded(int, 1), bounded(int, 0)
positive_float, non_negative_float = bounded(float, 0, low_open=True), bounded(float, 0)
# A seed: a whole number from 0 to the largest int64, what numpy's generators, torch.manual_seed and an h5 file's
# attributes all take (a larger one fails in whichever of them meets it first, after work was done).
MAX_SEED = 2 ** 63 - 1
seed_int = bounded(int, 0, MAX_SEED)


def flop_count(text: str) -> int:
    """argparse type: '1e17' or '100000000000000000' -> the exact int (no float rounding), > 0."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"expected a FLOP count such as 1e17, got {text!r}") from None
    if not value.is_finite() or value <= 0 or value != value.to_integral_value():
        raise argparse.ArgumentTypeError(f"expected a positive whole FLOP count such as 1e17, got {text!r}")
    return int(value)


class _Unset(list):
    """The value a flag the command line did not give keeps in `typed_dests`' probe (a list, so that an `append`
    action copies it into a new list rather than failing)."""


def typed_dests(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> set[str]:
    """The dests of the flags the command line `argv` (None: sys.argv) gives, whatever their values: a flag typed
    with its default value is given too, which comparing the parsed value with parser.get_default cannot tell. Parse
    `argv` with `parser` first (its errors are reported there): here it is parsed again into a namespace that holds a
    marker for every dest, and argparse fills in a default only where a dest is missing."""
    unset = _Unset()
    dests = vars(parser.parse_args(argv))
    probe = parser.parse_args(argv, namespace=argparse.Namespace(**{dest: unset for dest in dests}))
    return {dest for dest, value in vars(probe).items() if value is not unset}
