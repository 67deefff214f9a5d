"""LLMTIME encoding: round trip, no look-ahead, robust decoding."""
import numpy as np
import pytest

from data.dataset import make_eval_example
from data.llmtime import Scaler, decode, encode, format_prompt


@pytest.mark.parametrize("seed", range(40))
def test_round_trip_equals_rounded_values(seed):
    rng = np.random.default_rng(seed)
    n_vars, steps, decimals = int(rng.integers(1, 6)), int(rng.integers(1, 30)), int(rng.integers(0, 4))
    values = rng.normal(0, rng.uniform(0.1, 20), size=(steps, n_vars))  # negatives included
    scaler = Scaler.fit(values[: max(1, steps // 2)])
    text = encode(values, scaler, decimals)
    decoded, report = decode(text, scaler, decimals=decimals)
    assert report.ok and report.n_steps == steps and " " not in text
    expected = np.round(values / scaler.scale, decimals) * scaler.scale
    np.testing.assert_allclose(decoded, expected, rtol=0, atol=1e-9 * np.abs(expected).max() + 1e-12)


def test_encoding_format_by_hand():
    scaler = Scaler.fixed(2.0, 2)
    assert encode(np.array([[1.84, 1.48], [1.12, -0.006]]), scaler) == "0.92,0.74;0.56,0.00"
    assert format_prompt(np.array([[1.84, 1.48]]), scaler) == "0.92,0.74;"
    assert encode(np.array([-3.0, 25.0]), Scaler.fixed(1.0, 1), decimals=1) == "-3.0;25.0"


def test_scaler_maps_the_95th_percentile_of_the_history_to_one():
    history = np.stack([np.arange(1, 101, dtype=float), 0.5 * np.arange(1, 101, dtype=float)], axis=1)
    scaler = Scaler.fit(history)
    np.testing.assert_allclose(scaler.scale, [np.percentile(history[:, 0], 95), np.percentile(history[:, 1], 95)])
    assert Scaler.fit(np.zeros((5, 2))).scale.tolist() == [1.0, 1.0]  # no division by zero
    with pytest.raises(ValueError, match="finite and > 0"):
        Scaler.fixed(0.0, 2)


def test_no_look_ahead_changing_the_target_leaves_the_prompt_unchanged():
    rng = np.random.default_rng(0)
    trajectory = rng.uniform(0, 5, size=(100, 2))
    altered = trajectory.copy()
    altered[50:] *= 100.0  # a wildly different future
    a, b = make_eval_example(trajectory, 0), make_eval_example(altered, 0)
    assert a.prompt == b.prompt
    np.testing.assert_array_equal(a.scaler.scale, b.scaler.scale)
    assert not np.array_equal(a.target, b.target)


@pytest.mark.parametrize("text, steps, bad, first_bad, truncated", [
    ("0.92,0.74;0.56,0.77;0.34,0.70", 3, 0, None, False),
    ("0.92,0.74;0.56,0.77;", 2, 0, None, False),  # trailing separator
    ("0.92,0.74;0.56,0.7", 1, 1, 10, True),  # cut off inside a number
    ("0.92,0.74;0.56,", 1, 1, 10, True),  # cut off after a comma
    ("0.92,0.74;0.56", 1, 1, 10, True),
    ("0.92,0.74;0.5x,0.77;0.34,0.70", 1, 1, 10, False),  # valid steps after a bad one are not kept
    ("0.92,0.74;;0.34,0.70", 1, 1, 10, False),
    ("0.92;0.56,0.77", 0, 1, 0, False),  # one variable missing
    ("0.92,0.74,0.1;0.56,0.77", 0, 1, 0, False),  # one too many
    ("garbage", 0, 1, 0, False),
    ("", 0, 0, None, False),
    ("0.9,0.74", 0, 1, 0, False),  # wrong number of decimals
    ("a;b;c;", 0, 3, 0, False),
])
def test_decode_keeps_the_valid_prefix_and_counts_failures(text, steps, bad, first_bad, truncated):
    values, report = decode(text, Scaler.fixed(2.0, 2), decimals=2)
    assert (report.n_steps, report.n_bad, report.first_bad_pos, report.truncated) == (steps, bad, first_bad, truncated)
    assert values.shape == (steps, 2)
    if steps:
        np.testing.assert_allclose(values[0], [1.84, 1.48])


def test_decode_never_raises_on_random_text():
    rng = np.random.default_rng(1)
    alphabet = list("0123456789.,;- x\n") + ["", "1e5", "nan", "ï"]
    scaler = Scaler.fixed(1.0, 2)
    for _ in range(2000):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 40))))
        for decimals in (None, 0, 2):
            values, report = decode(text, scaler, decimals=decimals)
            assert values.shape == (report.n_steps, 2) and np.isfinite(values).all()
    assert decode(None, scaler)[1].n_steps == 0  # not even a string
