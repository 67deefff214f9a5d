"""Simulator (checked by the LV invariant), h5 schema validation, default data source, split."""
import h5py
import numpy as np
import pytest

from conftest import LV_H5
from data import lotka_volterra as lv


def test_simulated_trajectories_are_positive_and_conserve_the_lv_invariant():
    data = lv.simulate(n=200, steps=100, seed=3)
    x = data.trajectories.astype(np.float64)
    assert x.shape == (200, 100, 2) and np.isfinite(x).all() and (x > 0).all()
    p = {k: data.params[k][:, None] for k in ("alpha", "beta", "gamma", "delta")}
    invariant = lv.lv_invariant(x[..., 0], x[..., 1], p["alpha"], p["beta"], p["gamma"], p["delta"])
    drift = np.abs(invariant - invariant[:, :1]) / np.abs(invariant[:, :1])
    assert drift.max() <= 1e-4
    assert 0.5 < np.median(x[..., 0].max(axis=1)) < 10  # coursework magnitudes
    np.testing.assert_allclose(x[:, 0, 0], data.params["x0"], rtol=1e-6)


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
    assert all(np.array_equal(back.params[k], data.params[k]) for k in lv.PARAM_NAMES)


def write_h5(path, trajectories, time, extra=None):
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


def test_time_must_increase_and_extra_datasets_are_ignored(tmp_path):
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


def test_split_is_seeded_disjoint_complete_and_recorded():
    split = lv.split_indices(1000, seed=0)
    assert (len(split.train), len(split.val), len(split.test)) == (700, 150, 150)
    assert sorted(np.concatenate([split.train, split.val, split.test]).tolist()) == list(range(1000))
    np.random.seed(123)  # global numpy state must not matter
    again = lv.split_indices(1000, seed=0)
    assert all(np.array_equal(split[k], again[k]) for k in ("train", "val", "test"))
    assert not np.array_equal(split.test, lv.split_indices(1000, seed=1).test)
    restored = lv.Split.from_dict(split.to_dict())
    assert np.array_equal(restored.test, split.test) and restored.which(int(split.val[0])) == "val"
    with pytest.raises(ValueError, match="summing to 1"):
        lv.split_indices(10, fractions=(0.5, 0.5, 0.5))


def test_cli_simulates_and_checks(tmp_path, capsys):
    out = tmp_path / "sim.h5"
    assert lv.main(["--simulate", "--out", str(out), "--n", "5", "--steps", "20"]) == 0
    assert len(lv.load(out)) == 5
    assert lv.main(["--check", str(out)]) == 0
    assert "5 trajectories x 20 steps" in capsys.readouterr().out
    assert lv.main(["--check", str(tmp_path / "nope.h5")]) == 2
