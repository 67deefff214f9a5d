"""The shipped pretrained bases (models/series-tiny, the demo's; models/lv-tiny): each loads through the real Qwen's
path, its weights are the ones its README names (sha256), it forecasts zero-shot through forecast.py, and its
recipe's first steps reproduce."""
import hashlib
import json
import re

import numpy as np
import pytest

import forecast
from data.lotka_volterra import save, simulate
from forecasting.grammar import max_forecast_tokens
from models import recipe
from qwen_mini import Qwen, QwenConfig, load_model_and_tokenizer

RECIPES = pytest.mark.parametrize("base", list(recipe.RECIPES.values()), ids=list(recipe.RECIPES))


@RECIPES
def test_a_base_is_the_model_its_readme_names(base):
    model = base.model_dir
    readme = (model / "README.md").read_text()
    recorded = re.search(r"sha256 of `model.safetensors`: `([0-9a-f]{64})`", readme).group(1)
    assert hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest() == recorded
    assert json.loads((model / "recipe.json").read_text())["sha256"] == recorded
    assert sum((model / name).stat().st_size for name in recipe.FILES) <= 20e6
    assert {p.name for p in model.iterdir()} >= set(recipe.FILES)


@RECIPES
def test_a_base_loads_like_the_real_qwen_and_fits_a_forecast(base):
    model, tokenizer = load_model_and_tokenizer(base.model_dir)  # the from_pretrained path of every --model directory
    assert isinstance(model, Qwen) and model.config == QwenConfig.from_name(base.preset)
    assert tokenizer.encode("0.25,1.03;") == [tokenizer.token_to_id(c) for c in "0.25,1.03;"]  # one per character
    assert tokenizer.eos_id == model.config.eos_token_id and tokenizer.pad_id == model.config.pad_token_id
    # Positions: the demo's training windows (ctx 768), and the longest forecast: a 50-step prompt with numbers up
    # to 3 integer digits (the grammar's limit) plus the longest 50-step horizon the grammar admits.
    longest_prompt = 50 * 2 * len("999.99,")
    assert model.config.max_position_embeddings >= max(768, longest_prompt + max_forecast_tokens(50, 2))


def test_the_demos_base_forecasts_zero_shot(tmp_path, capsys):
    data = tmp_path / "lv.h5"
    save(data, simulate(n=20, steps=100, seed=7))
    out = tmp_path / "runs" / "fc"
    code = forecast.main(["--model", str(recipe.MODEL_DIR), "--data", str(data), "--limit", "2", "--horizon", "8",
                          "--baselines", "persistence", "--out", str(out), "--runs-dir", str(tmp_path / "runs"),
                          "--quiet"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "metrics.json").read_text())
    assert result["trajectories"] == [17, 18] and result["parse_failures"] == 0 and result["n_scored"] == 2
    assert np.isfinite(result["metrics"]["model"]["prey"]["mse"])


@RECIPES
def test_recipe_first_steps_reproduce(tmp_path, base):
    """The recipe from scratch (init, its data set, training) gives the recorded losses of its first steps: the same
    data, batches, initial weights and updates."""
    recorded = json.loads((base.model_dir / "recipe.json").read_text())["first_losses"]
    losses = recipe.first_losses(tmp_path / "work", len(recorded), base)
    # bf16 autocast: another CPU's kernels may round differently in the last bits.
    np.testing.assert_allclose(losses, recorded, rtol=2e-3)
