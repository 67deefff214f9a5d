"""Training windows and evaluation examples, with the real Qwen tokenizer (fixture) and the tiny char tokenizer."""
import numpy as np
import pytest

from data.dataset import IGNORE_INDEX, TrainWindows, make_eval_example, shuffled_order, window_starts
from data.llmtime import Scaler, encode
from data.lotka_volterra import simulate
from qwen_mini import char_tokenizer


def test_every_value_in_0_10_costs_the_same_number_of_tokens(qwen_tokenizer):
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 9.994, size=(200, 2))
    text = encode(values, Scaler.fixed(1.0, 2), decimals=2)
    ids = qwen_tokenizer.encode(text)
    # "d.dd" is 4 tokens, plus one separator per value: exactly 5 tokens per value
    assert len(ids) == 200 * 2 * 5 - 1
    assert all(len(qwen_tokenizer.encode(f"{v:.2f}")) == 4 for v in values.ravel())


def test_windows_have_ctx_tokens_and_padding_is_ignored(qwen_tokenizer):
    data = simulate(n=6, steps=100, seed=0)
    windows = TrainWindows(data.trajectories, qwen_tokenizer, ctx=256, stride=100)
    assert windows.input_ids.shape[1] == 256 and len(windows) == sum(windows.windows_per_trajectory)
    for i in range(len(windows)):
        item = windows[i]
        pad = item["input_ids"] == qwen_tokenizer.pad_id
        assert (item["labels"][pad] == IGNORE_INDEX).all()
        assert (item["labels"][~pad] == item["input_ids"][~pad]).all()
    last = windows[windows.windows_per_trajectory[0] - 1]
    assert (last["labels"] == IGNORE_INDEX).any()  # the tail window of a trajectory is padded


def test_training_text_starts_with_the_evaluation_prompt_token_for_token(qwen_tokenizer):
    """Train/eval consistency: with fit_steps == n_context, the tokens of the evaluation prompt are exactly the first
    tokens of the training text of the same trajectory (same scale, same digits, same tokenization)."""
    trajectory = simulate(n=1, steps=100, seed=5).trajectories[0]
    windows = TrainWindows(trajectory[None], qwen_tokenizer, ctx=2048, fit_steps=50)
    prompt_ids = qwen_tokenizer.encode(make_eval_example(trajectory, 0, n_context=50, horizon=50).prompt)
    assert windows.input_ids[0, :len(prompt_ids)].tolist() == prompt_ids
    # One token per character: digits 15-24, "." 13, "," 11, ";" 26 (the fixture README's reference ids).
    assert qwen_tokenizer.encode("0.25,1.03;") == [15, 13, 17, 20, 11, 16, 13, 15, 18, 26]


def test_windows_cover_each_trajectory_text_exactly():
    tokenizer = char_tokenizer()
    data = simulate(n=3, steps=40, seed=1)
    ctx, stride = 64, 48
    windows = TrainWindows(data.trajectories, tokenizer, ctx=ctx, stride=stride, fit_steps=20)
    text = encode(data.trajectories[0], Scaler.fit(data.trajectories[0][:20]), 2)
    tokens = tokenizer.encode(text)
    starts = window_starts(len(tokens), ctx, stride)
    assert starts[0] == 0 and starts[-1] + ctx >= len(tokens) and starts[-2] + ctx < len(tokens)
    rebuilt = {}
    for row, start in enumerate(starts):
        real = windows.labels[row] != IGNORE_INDEX
        for offset, token in enumerate(windows.input_ids[row][real].tolist()):
            rebuilt[start + offset] = token
    assert [rebuilt[i] for i in range(len(tokens))] == tokens


def test_training_scaler_uses_only_the_first_fit_steps():
    tokenizer = char_tokenizer()
    data = simulate(n=1, steps=60, seed=2)
    changed = data.trajectories.copy()
    changed[0, 30:] *= 1.5
    a = TrainWindows(data.trajectories, tokenizer, ctx=2000, fit_steps=30)
    b = TrainWindows(changed, tokenizer, ctx=2000, fit_steps=30)
    prefix = len(tokenizer.encode(encode(data.trajectories[0, :30], Scaler.fit(data.trajectories[0, :30]), 2)))
    assert a.input_ids[0, :prefix].tolist() == b.input_ids[0, :prefix].tolist()


def test_eos_ends_each_trajectory_text_and_is_learned():
    tokenizer = char_tokenizer()
    data = simulate(n=2, steps=10, seed=3)
    plain = TrainWindows(data.trajectories, tokenizer, ctx=512, fit_steps=5)
    with_eos = TrainWindows(data.trajectories, tokenizer, ctx=512, fit_steps=5, eos=True)
    for row in range(2):
        n = int((plain.labels[row] != IGNORE_INDEX).sum())
        assert with_eos.input_ids[row, :n].tolist() == plain.input_ids[row, :n].tolist()
        assert with_eos.input_ids[row, n] == tokenizer.eos_id and with_eos.labels[row, n] == tokenizer.eos_id
        assert (with_eos.labels[row, n + 1:] == IGNORE_INDEX).all()


def test_window_count_matches_a_hand_computation():
    tokenizer = char_tokenizer()
    trajectory = np.full((1, 10, 2), 1.0)  # scaled to 1.00 everywhere: "1.00,1.00" x 10 joined by ";" = 99 tokens
    assert len(tokenizer.encode(encode(trajectory[0], Scaler.fit(trajectory[0]), 2))) == 99
    # stride 20: starts 0, 20, 40, 60 (60 + 40 >= 99)
    windows = TrainWindows(trajectory, tokenizer, ctx=40, fit_steps=10)
    assert windows.windows_per_trajectory == [4] and len(windows) == 4
    assert (windows.labels[3] != IGNORE_INDEX).sum() == 39  # tokens 60..98, then one padding position
    assert windows.n_tokens == 40 * 3 + 39


def test_shuffling_is_deterministic_per_seed_and_epoch():
    assert np.array_equal(shuffled_order(50, seed=1, epoch=0), shuffled_order(50, seed=1, epoch=0))
    assert not np.array_equal(shuffled_order(50, seed=1, epoch=0), shuffled_order(50, seed=1, epoch=1))
    assert sorted(shuffled_order(50, 3, 2).tolist()) == list(range(50))


def test_eval_example_splits_context_and_target():
    trajectory = np.arange(200, dtype=float).reshape(100, 2)
    ex = make_eval_example(trajectory, index=7, n_context=30, horizon=20)
    assert ex.context.shape == (30, 2) and ex.target.shape == (20, 2) and ex.index == 7
    np.testing.assert_array_equal(ex.target[0], trajectory[30])
    assert ex.prompt.endswith(";") and ex.prompt.count(";") == 30
    with pytest.raises(ValueError, match="cannot take a context of 90 and a horizon of 20"):
        make_eval_example(trajectory, 0, n_context=90, horizon=20)
    with pytest.raises(ValueError, match="both must be > 0"):
        make_eval_example(trajectory, 0, n_context=0, horizon=20)
    trajectory[0] = -1.0  # the example holds copies: later edits of the caller's array do not reach it
    assert ex.context[0].tolist() == [0.0, 1.0]
    # The scaler is fitted on the context only: 95th percentile of 0, 2, ..., 58 and of 1, 3, ..., 59.
    np.testing.assert_allclose(ex.scaler.scale, [np.percentile(np.arange(0, 60, 2), 95),
                                                 np.percentile(np.arange(1, 60, 2), 95)])


def test_bad_window_arguments():
    with pytest.raises(ValueError, match="0 < stride <= ctx"):
        TrainWindows(np.ones((1, 10, 2)), char_tokenizer(), ctx=16, stride=32)
    with pytest.raises(ValueError, match="fit_steps=50 must be between 1 and the trajectories' length T=10"):
        TrainWindows(np.ones((1, 10, 2)), char_tokenizer(), ctx=16)
    with pytest.raises(ValueError, match=r"shape \(N, T, V\), got \(10, 2\)"):
        TrainWindows(np.ones((10, 2)), char_tokenizer(), ctx=16, fit_steps=5)
