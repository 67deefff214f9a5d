"""Simulator (checked by the LV invariant and the varied prior's closed forms), h5 schema validation, default data
source, split, CLI."""
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import LV_H5

from data import lotka_volterra as lv


def test_simulated_trajectories_are_positive_and_conserve_the_lv_invariant():
    data = lv.simulate(n=200, steps=100, seed=3, prior="lv")
    x = data.trajectories.astype(np.float64)
    assert x.shape == (200, 100, 2) and np.isfinite(x).all() and (x > 0).all()
    p = {k: data.params[k][:, None] for k in ("alpha", "beta", "gamma", "delta")}
    invariant = lv.lv_invariant(x[..., 0], x[..., 1], p["alpha"], p["beta"], p["gamma"], p["delta"])
    drift = np.abs(invariant - invariant[:, :1]) / np.abs(invariant[:, :1])
    assert drift.max() <= 1e-4
    assert 0.5 < np.median(x[..., 0].max(axis=1)) < 10  # coursework magnitudes
    np.testing.assert_allclose(x[:, 0, 0], data.params["x0"], rtol=1e-6)
    np.testing.assert_allclose(data.time, np.arange(100) * 200 / 99)  # the coursework grid


def test_lv_parameters_come_from_the_documented_ranges_and_are_recorded():
    data = lv.simulate(n=300, steps=10, seed=4, prior="lv")
    p = data.params
    for key, values in (("alpha", p["alpha"]), ("gamma", p["gamma"]), ("x0", p["x0"]), ("y0", p["y0"]),
                        ("prey_equilibrium", p["gamma"] / p["delta"]),
                        ("predator_equilibrium", p["alpha"] / p["beta"])):
        low, high = lv.PRIORS["lv"][key]
        assert low - 1e-12 <= values.min() and values.max() <= high + 1e-12, key
    assert all(not p[k].any() for k in lv.MODEL_PARAM_NAMES)  # classic LV: no extra terms, no noise
    assert data.attrs["seed"] == 4 and data.attrs["prior"] == "lv"
    assert json.loads(data.attrs["ranges"])["alpha"] == list(lv.PRIORS["lv"]["alpha"])
    narrow = lv.simulate(n=5, steps=10, seed=4, prior="lv", alpha=(0.2, 0.2))
    assert np.all(narrow.params["alpha"] == 0.2)
    with pytest.raises(ValueError, match=r"range gamma=\(0.3, 0.1\) must satisfy 0 < low <= high"):
        lv.simulate(n=5, steps=10, gamma=(0.3, 0.1))
    with pytest.raises(ValueError, match=r"the 'lv' prior has no range 'capacity'"):
        lv.simulate(n=5, steps=10, prior="lv", capacity=(1, 2))
    with pytest.raises(ValueError, match=r"unknown prior 'nope'; choose from varied, lv"):
        lv.simulate(n=5, steps=10, prior="nope")


def test_varied_prior_draws_every_documented_range_and_records_it():
    data = lv.simulate(n=400, steps=10, seed=4)  # the default prior
    p, ranges = data.params, lv.PRIORS["varied"]
    derived = {"efficiency": p["delta"] / p["beta"], "capacity": 1 / p["inv_capacity"]}
    for key, (low, high) in ranges.items():
        values = derived.get(key, p.get(key))
        assert low - 1e-9 <= values.min() and values.max() <= high + 1e-9, key
        assert values.max() - values.min() > 0.8 * (high - low), key  # the whole range is used, not a corner
    assert data.attrs["prior"] == "varied" and json.loads(data.attrs["ranges"]) == {k: list(v) for k, v in
                                                                                    ranges.items()}


def test_varied_prior_without_noise_follows_the_documented_equations():
    """Closed forms: the coexistence equilibrium of the varied equations, x* = gamma / (delta - gamma*h) and
    y* = alpha*(1 - x*/K)*(1 + h*x*)/beta, is a fixed point; and classic LV is the case K = inf, h = 0."""
    alpha, beta, gamma, delta, h, k = 0.2, 0.4, 0.15, 0.2, 0.1, 10.0
    x_star = gamma / (delta - gamma * h)
    y_star = alpha * (1 - x_star / k) * (1 + h * x_star) / beta
    rhs = lv.lv_rhs(np.array([x_star, y_star]), alpha, beta, gamma, delta, 1 / k, h)
    np.testing.assert_allclose(rhs, 0.0, atol=1e-15)
    state = np.array([1.3, 0.7])
    np.testing.assert_allclose(lv.lv_rhs(state, alpha, beta, gamma, delta, 0.0, 0.0),
                               [alpha * 1.3 - beta * 1.3 * 0.7, delta * 1.3 * 0.7 - gamma * 0.7])
    # Starting at the equilibrium, a noise-free simulation stays there (the RK4 path of a fixed point).
    data = lv.simulate(n=1, steps=20, seed=0, alpha=(alpha, alpha), beta=(beta, beta),
                       efficiency=(delta / beta, delta / beta), gamma=(gamma, gamma), handling=(h, h),
                       capacity=(k, k), x0=(x_star, x_star), y0=(y_star, y_star), noise=(0, 0))
    np.testing.assert_allclose(data.trajectories[0], np.tile([x_star, y_star], (20, 1)), rtol=1e-6)


def test_varied_prior_shape_noise_and_variety():
    data = lv.simulate(n=300, steps=100, seed=5)
    x = data.trajectories.astype(np.float64)
    assert x.shape == (300, 100, 2) and np.isfinite(x).all() and (x > 0).all()
    # Observation noise: the first sample is the recorded start times exp(noise * N(0, 1)), within 5 sigma.
    log_ratio = np.log(x[:, 0] / np.stack([data.params["x0"], data.params["y0"]], axis=1))
    assert (np.abs(log_ratio) <= 5 * data.params["noise"][:, None] + 1e-6).all()
    # Variety: orbits that damp and orbits that grow (std of the prey over the second half against the first).
    ratio = x[:, 55:, 0].std(axis=1) / x[:, 10:55, 0].std(axis=1)
    assert (ratio < 0.5).mean() > 0.2 and (ratio > 1.1).mean() > 0.1
    same = lv.simulate(n=300, steps=100, seed=5)
    assert np.array_equal(same.trajectories, data.trajectories)


def test_rk4_is_fourth_order_on_exponential_growth():
    times = np.array([0.0, 1.0])
    errors = [abs(lv.rk4(lambda s: s, np.array([1.0]), times, n)[-1, 0] - np.e) for n in (4, 8)]
    assert 14 < errors[0] / errors[1] < 18  # halving the step divides the error by ~2^4


def test_simulation_is_deterministic_per_seed():
    a, b, c = lv.simulate(5, 20, seed=1), lv.simulate(5, 20, seed=1), lv.simulate(5, 20, seed=2)
    assert np.array_equal(a.trajectories, b.trajectories) and not np.array_equal(a.trajectories, c.trajectories)


def test_save_then_load_is_identical(tmp_path):
    data = lv.simulate(7, 30, seed=0)
    lv.save(tmp_path / "x.h5", data)
    back = lv.load(tmp_path / "x.h5")
    assert np.array_equal(back.trajectories, data.trajectories) and np.array_equal(back.time, data.time)
    assert all(np.array_equal(back.params[k], data.params[k]) for k in lv.PARAM_NAMES + lv.MODEL_PARAM_NAMES)
    assert back.attrs == data.attrs and back.path == str(tmp_path / "x.h5")
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary file behind


def write_h5(path, trajectories, time, extra=None):
    """An h5 file written directly with h5py (not by `save`), so the loader is tested against the raw schema."""
    with h5py.File(path, "w") as f:
        if trajectories is not None:
            f["trajectories"] = trajectories
        if time is not None:
            f["time"] = time
        for k, v in (extra or {}).items():
            f[k] = v
    return path


GOOD = np.ones((4, 6, 2), dtype=np.float32)
TIME = np.arange(6, dtype=np.float64)


@pytest.mark.parametrize("trajectories, time, message", [
    (None, TIME, r"dataset /trajectories is missing"),
    (GOOD, None, r"dataset /time is missing"),
    (np.ones((4, 6, 3)), TIME, r"/trajectories has shape \(4, 6, 3\), expected \(N, T, 2\)"),
    (GOOD, np.arange(5.0), r"/time has shape \(5,\), expected \(6,\)"),
    (np.ones((0, 6, 2)), TIME, r"needs at least 1 trajectory of at least 2 steps"),
    (np.array([[["a", "b"]]]).astype("S1"), np.arange(1.0), r"/trajectories has dtype \|S1, expected real numbers"),
])
def test_schema_violations_are_named(tmp_path, trajectories, time, message):
    path = write_h5(tmp_path / "bad.h5", trajectories, time)
    with pytest.raises(lv.DataError, match=message):
        lv.load(path)


@pytest.mark.parametrize("index, value, message", [
    ((2, 3, 1), np.nan, r"trajectories\[2, 3, 1\] is NaN"),
    ((0, 5, 0), -0.5, r"trajectories\[0, 5, 0\] is negative"),
    ((1, 1, 1), np.inf, r"trajectories\[1, 1, 1\] is infinite"),
])
def test_bad_values_are_named_with_their_index(tmp_path, index, value, message):
    trajectories = GOOD.copy()
    trajectories[index] = value
    path = write_h5(tmp_path / "bad.h5", trajectories, TIME)
    with pytest.raises(lv.DataError, match=str(path).replace(".", r"\.") + ": " + message):
        lv.load(path)


def test_params_group_must_follow_the_schema(tmp_path):
    params = {f"params/{k}": np.ones(4) for k in lv.PARAM_NAMES}
    assert lv.load(write_h5(tmp_path / "ok.h5", GOOD, TIME, extra=params)).params["beta"].shape == (4,)
    with pytest.raises(lv.DataError, match=r"/params/beta has shape \(3,\), expected \(4,\)"):
        lv.load(write_h5(tmp_path / "shape.h5", GOOD, TIME, extra={**params, "params/beta": np.ones(3)}))
    del params["params/y0"]
    with pytest.raises(lv.DataError, match=r"/params lacks y0"):
        lv.load(write_h5(tmp_path / "partial.h5", GOOD, TIME, extra=params))


def test_time_must_increase_and_extra_datasets_are_ignored(tmp_path):
    with pytest.raises(lv.DataError, match=r"time\[4\] is not finite \(nan\)"):
        lv.load(write_h5(tmp_path / "n.h5", GOOD, np.array([0, 1, 2, 3, np.nan, 5.0])))
    with pytest.raises(lv.DataError, match=r"time is not strictly increasing: time\[2\]=2\.0, time\[3\]=2\.0"):
        lv.load(write_h5(tmp_path / "t.h5", GOOD, np.array([0, 1, 2, 2, 4, 5.0])))
    data = lv.load(write_h5(tmp_path / "ok.h5", GOOD, TIME, extra={"notes": np.arange(3)}))
    assert data.trajectories.shape == (4, 6, 2)


def test_not_an_h5_file(tmp_path):
    (tmp_path / "x.h5").write_text("hello")
    with pytest.raises(lv.DataError, match="not a readable HDF5 file"):
        lv.load(tmp_path / "x.h5")
    with pytest.raises(lv.DataError, match="no such file"):
        lv.load(tmp_path / "missing.h5")


def test_real_coursework_file_loads_unchanged():
    if not LV_H5.is_file():
        pytest.skip("../shared/fixtures/lotka_volterra_data.h5 not present")
    data = lv.load(LV_H5)
    assert data.trajectories.shape == (1000, 100, 2) and data.time.shape == (100,)
    np.testing.assert_allclose(data.trajectories[0, :3], [[0.94991744, 1.040624], [0.74055135, 0.7795419],
                                                          [0.6822457, 0.56439036]])


def test_default_data_is_simulated_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_MINI_CACHE", str(tmp_path))
    monkeypatch.setattr(lv, "DEFAULT_N", 12)  # keep the test small; the path encodes the size
    first = lv.load_or_simulate(None)
    path = lv.default_data_path()
    assert path.parent == tmp_path and path.is_file() and len(first) == 12
    mtime = path.stat().st_mtime_ns
    second = lv.load_or_simulate(None)
    assert path.stat().st_mtime_ns == mtime and np.array_equal(first.trajectories, second.trajectories)
    assert np.array_equal(first.trajectories, lv.simulate(12, lv.DEFAULT_STEPS, lv.DEFAULT_SEED).trajectories)
    assert first.attrs["prior"] == lv.DEFAULT_PRIOR == "varied"


def test_default_cache_name_follows_the_simulator_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_MINI_CACHE", str(tmp_path))
    name = lv.default_data_path().name
    assert name.startswith("lv_simulated_n1000_t100_seed0_") and name.endswith(".h5")
    monkeypatch.setitem(lv.PRIORS["varied"], "alpha", (0.1, 0.2))  # a changed simulator must not reuse an old file
    assert lv.default_data_path().name != name
    monkeypatch.delenv("QWEN_MINI_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert lv.default_data_path().parent == tmp_path / "xdg" / "qwen_mini"


def test_a_broken_cached_file_is_named_with_a_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_MINI_CACHE", str(tmp_path))
    lv.default_data_path().write_text("not hdf5")
    with pytest.raises(lv.DataError, match="cached default data set: delete it"):
        lv.load_or_simulate(None)


def test_default_split_is_in_file_order_with_the_last_15_percent_as_test():
    split = lv.split_indices(1000)
    assert split.mode == "ordered"
    assert split.train.tolist() == list(range(700)) and split.val.tolist() == list(range(700, 850))
    assert split.test.tolist() == list(range(850, 1000)) and split.which(972) == "test"
    assert lv.split_indices(1000, seed=5).test.tolist() == split.test.tolist()  # the seed plays no part
    restored = lv.Split.from_dict(split.to_dict())
    assert restored.mode == "ordered" and np.array_equal(restored.val, split.val)
    small = lv.split_indices(20)
    assert small.test.tolist() == [17, 18, 19] and small.val.tolist() == [14, 15, 16]
    with pytest.raises(ValueError, match="split mode must be one of ordered, random, got 'shuffled'"):
        lv.split_indices(10, mode="shuffled")


def test_a_recorded_split_without_a_mode_is_the_old_random_one():
    old = lv.split_indices(1000, seed=0, mode="random").to_dict()
    del old["mode"]  # what runs recorded before the ordered split existed
    restored = lv.Split.from_dict(old)
    assert restored.mode == "random" and restored.test.tolist() == old["test"]


def test_split_is_seeded_disjoint_complete_and_recorded():
    split = lv.split_indices(1000, seed=0, mode="random")
    assert (len(split.train), len(split.val), len(split.test)) == (700, 150, 150)
    assert sorted(np.concatenate([split.train, split.val, split.test]).tolist()) == list(range(1000))
    np.random.seed(123)  # global numpy state must not matter
    again = lv.split_indices(1000, seed=0, mode="random")
    assert all(np.array_equal(split[k], again[k]) for k in ("train", "val", "test"))
    assert not np.array_equal(split.test, lv.split_indices(1000, seed=1, mode="random").test)
    restored = lv.Split.from_dict(split.to_dict())
    assert np.array_equal(restored.test, split.test) and restored.which(int(split.val[0])) == "val"
    with pytest.raises(ValueError, match="summing to 1"):
        lv.split_indices(10, fractions=(0.5, 0.5, 0.5))
    with pytest.raises(KeyError, match="trajectory index 1000 is in no split"):
        split.which(1000)


@pytest.mark.parametrize("fractions", [(0.7, 0.15, 0.15), (0.5, 0.5, 0.0), (1.0, 0.0, 0.0), (0.34, 0.33, 0.33)])
def test_split_partitions_small_sets_exactly(fractions):
    for n in range(0, 25):
        split = lv.split_indices(n, seed=n, fractions=fractions, mode=("ordered", "random")[n % 2])
        parts = [split.train, split.val, split.test]
        assert sorted(np.concatenate(parts).tolist()) == list(range(n))
        assert all(np.array_equal(p, np.sort(p)) for p in parts)
        assert abs(len(split.train) - n * fractions[0]) <= 1 and abs(len(split.val) - n * fractions[1]) <= 1


def test_cli_simulates_and_checks(tmp_path, capsys):
    out = tmp_path / "sim.h5"
    assert lv.main(["--simulate", "--out", str(out), "--n", "5", "--steps", "20"]) == 0
    assert len(lv.load(out)) == 5
    assert lv.main(["--check", str(out)]) == 0
    assert "5 trajectories x 20 steps" in capsys.readouterr().out
    assert lv.main(["--check", str(tmp_path / "nope.h5")]) == 2
    with pytest.raises(SystemExit) as exit_info:
        lv.main(["--help"])
    assert exit_info.value.code == 0 and "--simulate" in capsys.readouterr().out


def test_module_runs_as_a_script(tmp_path):
    """`python -m data.lotka_volterra --simulate --out FILE` writes a file that loads."""
    out = tmp_path / "some.h5"
    result = subprocess.run([sys.executable, "-m", "data.lotka_volterra", "--simulate", "--out", str(out),
                             "--n", "4", "--steps", "30", "--seed", "5"], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    data = lv.load(out)
    assert data.trajectories.shape == (4, 30, 2)
    assert np.array_equal(data.trajectories, lv.simulate(4, 30, seed=5).trajectories)


@pytest.mark.parametrize("cli", ["data.lotka_volterra", "data.synthetic"])
@pytest.mark.parametrize("seed", [str(2 ** 76), str(2 ** 63), "-1"])
def test_the_data_clis_refuse_a_seed_an_h5_attribute_cannot_hold(tmp_path, capsys, cli, seed):
    """Beyond an int64 the file could not record its seed (the traceback came after simulating everything)."""
    import importlib
    main = importlib.import_module(cli).main
    argv = (["--simulate"] if cli == "data.lotka_volterra" else []) + ["--n", "3", "--seed", seed,
                                                                        "--out", str(tmp_path / "x.h5")]
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2 and "argument --seed: expected an integer >= 0 and <= 9223372036854775807" in \
        capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()
    with pytest.raises(ValueError, match="seed from 0 to 2\\*\\*63 - 1"):  # the functions behind them, too
        lv.simulate(n=3, seed=int(seed)) if cli == "data.lotka_volterra" else \
            importlib.import_module(cli).generate(3, int(seed))
