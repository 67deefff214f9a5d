"""The types of a settings dataclass's values, checked against its annotations (`check_field_types`): one rule for
every settings object (TrainConfig, ForecastConfig), whether the values came from a command line, a plan file or a
test. A value of the wrong type (a TOML `full = "no"`, `lr = true`, `baselines = "persistence"`) is refused by name
instead of being used as whatever Python makes of it."""
from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing


class SettingsError(ValueError):
    """A setting that cannot be used; `key` names it when one value is at fault."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def check_field_types(settings, error: type[SettingsError] = SettingsError) -> None:
    """Raise `error` (its `key` set) for the first field of dataclass `settings` whose value does not have its
    annotated type: bool only true/false, int a whole number (not a bool), float any number (not a bool), str a
    string, tuple[X, ...] a list or tuple of X, `| None` also None."""
    hints = _hints(type(settings))
    for f in dataclasses.fields(settings):
        value, expected = getattr(settings, f.name), hints[f.name]
        if not _matches(value, expected):
            raise error(f"{f.name} must be {_describe(expected)}, got {value!r}", key=f.name)


@functools.cache
def _hints(cls: type) -> dict:
    """A class's resolved annotations (typing.get_type_hints takes milliseconds; a plan checks thousands of runs)."""
    return typing.get_type_hints(cls)


def _matches(value, expected) -> bool:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is str:  # a path given as a Path is a string too
        return isinstance(value, (str, os.PathLike))
    if origin is tuple:
        item = typing.get_args(expected)[0]
        return isinstance(value, (tuple, list)) and all(_matches(v, item) for v in value)
    return True  # a type this check does not know: the settings' own rules decide


def _describe(expected) -> str:
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(expected) if o is not type(None)]
        return " or ".join(_describe(o) for o in options) + " (or left out)"
    if typing.get_origin(expected) is tuple:
        item = typing.get_args(expected)[0]
        return "a list of " + {str: "strings", int: "whole numbers", float: "numbers"}.get(item, _describe(item))
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(
        expected, getattr(expected, "__name__", str(expected)))
