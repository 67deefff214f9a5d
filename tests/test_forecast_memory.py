"""Rows per generate call from a memory budget, and a forecast's calls (issue 25): `call_plan`, `call_memory`,
`rows_per_call`, and forecast_examples splitting one trajectory's samples over several calls."""
import pytest
import torch

from data.dataset import make_eval_example
from data.lotka_volterra import simulate
from forecasting.forecast import (
    GenerationTooLarge,
    call_memory,
    call_plan,
    forecast_examples,
    generation_plan,
    grammar_candidates,
    rows_per_call,
)
from qwen_mini import load_model_and_tokenizer
from qwen_mini.flops import generation_flops
from qwen_mini.generate import JUMP_TOKENS


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matrices are too small to share between threads (see test_forecast.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    return load_model_and_tokenizer("tiny", seed=0)


def test_call_plan_by_hand():
    # 7 rows, 3 samples: two trajectories a call; the last call holds the fifth alone
    assert call_plan(5, 3, 7) == [(0, 2, 3), (2, 4, 3), (4, 5, 3)]
    # 2 rows, 5 samples: each trajectory's samples in calls of 2, 2 and 1
    assert call_plan(2, 5, 2) == [(0, 1, 2), (0, 1, 2), (0, 1, 1), (1, 2, 2), (1, 2, 2), (1, 2, 1)]


def test_call_memory_holds_the_caches_generate_builds(tiny):
    """The estimate covers at least the bytes of the prompt's cache (per prompt) and of a sample's own cache for the
    new tokens (per row) that generate allocates: counted here from the tensors themselves."""
    model, _ = tiny
    prompt_len, new = 30, 12
    memory = call_memory(model, prompt_len, new, head_rows=13)
    with torch.inference_mode():
        prompt_cache = model.new_cache(2, prompt_len)
        model(torch.ones(2, prompt_len, dtype=torch.long), kv_cache=prompt_cache)
        shared = prompt_cache.share(3, suffix_len=new + JUMP_TOKENS)
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)
    assert memory.per_prompt >= nbytes(prompt_cache.k + prompt_cache.v) / 2
    assert memory.per_row >= nbytes(shared.k + shared.v) / 6
    assert memory.of(2, 6) == 2 * memory.per_prompt + 6 * memory.per_row


def test_rows_per_call_fills_the_budget_and_an_explicit_batch_wins(tiny):
    model, _ = tiny
    memory = call_memory(model, 40, 20, head_rows=None)
    gb = lambda n: n / 2 ** 30
    exactly_three = gb(memory.of(3, 3 * 4))  # three trajectories of 4 samples fit, a fourth does not
    assert rows_per_call(model, 40, 20, 4, memory_gb=exactly_three) == 12
    assert rows_per_call(model, 40, 20, 4, memory_gb=exactly_three - gb(1)) == 8
    # not even one trajectory's 4 samples: as many samples of one as fit (2 here); not even one: refused, naming
    # the budget (issue 35: "at least one row" let --decimals 1000 run into a 23 GB OOM kill)
    assert rows_per_call(model, 40, 20, 4, memory_gb=gb(memory.of(1, 2))) == 2
    assert rows_per_call(model, 40, 20, 4, memory_gb=gb(memory.of(1, 1))) == 1
    with pytest.raises(GenerationTooLarge, match=r"one prompt of 40 tokens and one row .* over --memory-budget"):
        rows_per_call(model, 40, 20, 4, memory_gb=gb(memory.of(1, 1) - 1))
    assert rows_per_call(model, 40, 20, 4, batch=5, memory_gb=exactly_three) == 5


def test_samples_split_over_several_calls_are_those_of_one_call(tiny):
    """5 samples of each of 2 trajectories, 2 rows a call (each trajectory in calls of 2, 2, 1 samples) against all
    10 rows in one call: every trajectory gets its 5 samples, the same texts (the sampling draws are taken from one
    generator in row order either way), and the FLOP plan counts the calls that ran."""
    model, tokenizer = tiny
    data = simulate(n=2, steps=30, seed=5)
    examples = [make_eval_example(data.trajectories[i], i, n_context=20, horizon=3) for i in range(2)]
    kwargs = dict(progress=False, seed=4, temperature=1.0, num_samples=5)
    split = forecast_examples(model, tokenizer, examples, batch=2, **kwargs)
    whole = forecast_examples(model, tokenizer, examples, batch=10, **kwargs)
    assert [len(fc.texts) for fc in split] == [5, 5]
    assert [fc.texts for fc in split] == [fc.texts for fc in whole]
    assert len({text for fc in whole for text in fc.texts}) > 2
    prompt = len(tokenizer.encode(examples[0].prompt))
    planned = generation_plan(model, [prompt, prompt], [9, 9], batch=2, num_samples=5)
    per_call = [generation_flops(model, 1, prompt, rows, 9, head_rows=grammar_candidates()).total for rows in (2, 2, 1)]
    assert planned == 2 * sum(per_call)


def test_memory_budget_flag_reaches_the_config_and_rejects_a_non_positive_budget(capsys):
    from forecasting.cli import build_parser, forecast_config
    from forecasting.config import ForecastConfig

    parser = build_parser()
    args = parser.parse_args(["--model", "tiny", "--memory-budget", "0.5"])
    config = forecast_config(args)
    assert (config.memory_gb, config.batch) == (0.5, None)
    assert forecast_config(parser.parse_args(["--model", "tiny"])).memory_gb == ForecastConfig().memory_gb
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--model", "tiny", "--memory-budget", "0"])
    assert exit_info.value.code == 2
    assert "--memory-budget: expected a number > 0.0, got '0'" in capsys.readouterr().err


def test_samples_held_until_scoring_are_checked_against_the_budget_by_hand(capsys):
    from forecasting.cli import main
    from forecasting.forecast import check_samples_fit, held_samples_bytes

    # one sample of a 10-step, 2-variable forecast of at most 40 tokens: text 2 * 40 + 64, values 3 * 10 * 2 * 8
    assert held_samples_bytes(1, 1, 40, 10, 2) == 144 + 480
    assert held_samples_bytes(3, 5, 40, 10, 2) == 15 * 624
    check_samples_fit(3, 5, 40, 10, 2, memory_gb=15 * 624 / 2 ** 30)  # exactly the budget: fits
    with pytest.raises(ValueError, match=r"--num-samples 5 for 3 trajectories .* use at most 4 samples"):
        check_samples_fit(3, 5, 40, 10, 2, memory_gb=14 * 624 / 2 ** 30)
    # Through forecast.py: one line, exit 2, before any model output or reservation
    # (10,000 samples is ForecastConfig's limit: 150 x 10,000 samples of up to 701 tokens hold about 5.4 GiB > 4)
    assert main(["--model", "tiny", "--num-samples", "10000", "--temperature", "1", "--no-budget",
                 "--out", "/nonexistent/never-created"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --num-samples 10000 for 150 trajectories holds about")
