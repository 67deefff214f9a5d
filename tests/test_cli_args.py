"""The shared argparse number types: bounds, open bounds, non-finite input and the message naming the value."""
import argparse

import pytest

from common.args import bounded, non_negative_float, non_negative_int, positive_float, positive_int


@pytest.mark.parametrize("parse, text, value", [(positive_int, "3", 3), (non_negative_int, "0", 0),
                                                (positive_float, "1e-5", 1e-5), (non_negative_float, "0", 0.0),
                                                (bounded(float, 0, 1, low_open=True), "1", 1.0)])
def test_values_inside_the_bounds_parse(parse, text, value):
    assert parse(text) == value and type(parse(text)) is type(value)


@pytest.mark.parametrize("parse, text, wanted", [
    (positive_int, "0", "expected an integer >= 1, got '0'"),
    (positive_int, "1.5", "expected an integer >= 1, got '1.5'"),
    (non_negative_int, "-1", "expected an integer >= 0, got '-1'"),
    (positive_float, "0", "expected a number > 0, got '0'"),
    (non_negative_float, "nan", "expected a number >= 0, got 'nan'"),
    (positive_float, "inf", "expected a number > 0, got 'inf'"),
    (bounded(float, 0, 1, low_open=True), "1.5", "expected a number > 0 and <= 1, got '1.5'"),
])
def test_values_outside_the_bounds_name_the_bound_and_the_value(parse, text, wanted):
    with pytest.raises(argparse.ArgumentTypeError) as error:
        parse(text)
    assert str(error.value) == wanted


def test_a_trajectory_named_twice_is_forecast_once_in_the_order_first_given():
    from forecasting.cli import build_parser, requested_samples

    args = build_parser().parse_args(["--model", "tiny", "--sample", "900", "972", "900",
                                      "--samples-idx", "972,5,,900"])
    assert requested_samples(args) == [900, 972, 5]
