"""models/lv-tiny: the shipped pretrained base. It loads through the real Qwen's path, its weights are the ones its
README names (sha256), it forecasts zero-shot through forecast.py, and its recipe's first steps reproduce."""
import hashlib
import json
import re

import numpy as np

import forecast
from data.lotka_volterra import save, simulate
from forecasting.grammar import max_forecast_tokens
from models import recipe
from qwen_mini import Qwen, QwenConfig, load_model_and_tokenizer

MODEL = recipe.MODEL_DIR


def test_lv_tiny_is_the_model_its_readme_names():
    readme = (MODEL / "README.md").read_text()
    recorded = re.search(r"sha256 of `model.safetensors`: `([0-9a-f]{64})`", readme).group(1)
    assert hashlib.sha256((MODEL / "model.safetensors").read_bytes()).hexdigest() == recorded
    assert json.loads((MODEL / "recipe.json").read_text())["sha256"] == recorded
    assert sum((MODEL / name).stat().st_size for name in recipe.FILES) <= 20e6
    assert {p.name for p in MODEL.iterdir()} >= set(recipe.FILES)


def test_lv_tiny_loads_like_the_real_qwen_and_fits_a_forecast():
    model, tokenizer = load_model_and_tokenizer(MODEL)  # the from_pretrained path of every --model directory
    assert isinstance(model, Qwen) and model.config == QwenConfig.from_name(recipe.PRESET)
    assert tokenizer.encode("0.25,1.03;") == [tokenizer.token_to_id(c) for c in "0.25,1.03;"]  # one per character
    assert tokenizer.eos_id == model.config.eos_token_id and tokenizer.pad_id == model.config.pad_token_id
    # Positions: the demo's training windows (ctx 768), and the longest forecast: a 50-step prompt with numbers up
    # to 3 integer digits (the grammar's limit) plus the longest 50-step horizon the grammar admits.
    longest_prompt = 50 * 2 * len("999.99,")
    assert model.config.max_position_embeddings >= max(768, longest_prompt + max_forecast_tokens(50, 2))


def test_lv_tiny_forecasts_zero_shot(tmp_path, capsys):
    data = tmp_path / "lv.h5"
    save(data, simulate(n=20, steps=100, seed=7))
    out = tmp_path / "runs" / "fc"
    code = forecast.main(["--model", str(MODEL), "--data", str(data), "--limit", "2", "--horizon", "8",
                          "--baselines", "persistence", "--out", str(out), "--runs-dir", str(tmp_path / "runs"),
                          "--quiet"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "metrics.json").read_text())
    assert result["trajectories"] == [17, 18] and result["parse_failures"] == 0 and result["n_scored"] == 2
    assert np.isfinite(result["metrics"]["model"]["prey"]["mse"])


def test_recipe_first_steps_reproduce(tmp_path):
    """The recipe from scratch (init, its simulated data set, training) gives the recorded losses of its first steps:
    the same data, batches, initial weights and updates."""
    recorded = json.loads((MODEL / "recipe.json").read_text())["first_losses"]
    losses = recipe.first_losses(tmp_path / "work", len(recorded))
    # bf16 autocast: another CPU's kernels may round differently in the last bits.
    np.testing.assert_allclose(losses, recorded, rtol=2e-3)
