"""Broad synthetic series (data/synthetic.py): determinism, schema, non-negativity, the mix, the GP and AR
generators against closed forms, and the file through data.lotka_volterra.load and data.llmtime."""
import json

import h5py
import numpy as np
import pytest

from data import series_families as fam
from data import synthetic as syn
from data.llmtime import Scaler, decode, encode
from data.lotka_volterra import load

N = 200


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A default-mix set on the default grid, and the file it was saved to."""
    data = syn.generate(N, seed=5)
    path = syn.save(tmp_path_factory.mktemp("synthetic") / "s.h5", data)
    return data, path


def test_shape_dtype_time_grid_finite_non_negative_and_varied_scale(made):
    data, _ = made
    x = data.trajectories
    assert x.shape == (N, 100, 2) and x.dtype == np.float32 and data.params is None
    np.testing.assert_array_equal(data.time, np.linspace(0.0, 200.0, 100))  # the users' grid
    assert np.isfinite(x).all() and (x >= 0).all()
    top = x.max(axis=1)  # (N, 2): each channel's maximum
    assert top.min() < 0.1 and top.max() > 10  # levels spread over 1e-2..1e2
    assert np.percentile(top, 50) < 10 * np.percentile(top, 25)  # log-spread, not a few outliers
    # headroom: nothing rises above 10x its first 50 steps' 95th percentile (plus <= 2 % observation noise)
    level = np.percentile(x[:, :50].astype(np.float64), 95, axis=1)
    assert (x.max(axis=1) <= 10.5 * level).all()


def test_same_seed_same_data_other_seed_other_data():
    a = syn.generate(40, seed=3, steps=12)
    b = syn.generate(40, seed=3, steps=12)
    c = syn.generate(40, seed=4, steps=12)
    np.testing.assert_array_equal(a.trajectories, b.trajectories)
    np.testing.assert_array_equal(a.component, b.component)
    assert a.attrs == b.attrs
    assert not np.array_equal(a.trajectories, c.trajectories)


def test_the_mix_is_honoured_and_recorded(made):
    data, path = made
    codes, names = syn.read_components(path)
    assert names == syn.COMPONENTS
    np.testing.assert_array_equal(codes, data.component)
    weights = syn.check_mix(syn.DEFAULT_MIX)
    for code, name in enumerate(names):
        assert abs((codes == code).sum() - N * weights[name]) <= 1, name
    assert json.loads(data.attrs["counts"]) == {k: int((codes == i).sum()) for i, k in enumerate(names)}
    present = sum(w > 0 for w in weights.values())
    assert len(set(codes[:N // 2])) == present  # shuffled: the ordered split's train part has every component
    # Unnormalised weights; missing components weigh 0.
    other = syn.generate(101, seed=0, mix={"ar": 3, "sines": 1}, steps=20)
    counts = np.bincount(other.component, minlength=len(names))
    assert counts.tolist() == [0, 76, 25, 0, 0, 0]
    assert syn.allocate(7, {k: 1 for k in names}) == {"kernelsynth": 2, "ar": 1, "sines": 1, "ode": 1, "lv": 1,
                                                      "predprey": 1}
    assert sum(syn.allocate(40000, None).values()) == 40000


@pytest.mark.parametrize("mix, message", [
    ({"kernelsynth": 1, "fourier": 1}, r"unknown component 'fourier'"),
    ({"ar": -0.1}, r"weight of 'ar' is -0.1"),
    ({"ar": float("nan")}, r"weight of 'ar' is nan"),
    ({"ar": "lots"}, r"weight of 'ar' is 'lots', not a number"),
    ({"ar": 0, "lv": 0}, r"no positive weight"),
])
def test_a_bad_mix_is_refused(mix, message):
    with pytest.raises(ValueError, match=message):
        syn.generate(5, seed=0, mix=mix, steps=10)


def test_parse_mix_and_the_cli(tmp_path, capsys):
    assert syn.parse_mix("kernelsynth=0.4, ar=0.2") == {"kernelsynth": 0.4, "ar": 0.2}
    for text, message in (("ar=0.2,bogus=1", "unknown component 'bogus'"), ("ar=x", "weight of 'ar' is 'x'"),
                          ("ar", "'ar' is not COMPONENT=WEIGHT"), ("ar=1,ar=2", "'ar' is given twice"),
                          ("lv=-1", "weight of 'lv' is -1.0")):
        with pytest.raises(ValueError, match=message):
            syn.parse_mix(text)
        assert syn.main(["--n", "5", "--mix", text, "--out", str(tmp_path / "bad.h5")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: --mix: ") and message in err
    assert not (tmp_path / "bad.h5").exists()
    out = tmp_path / "cli.h5"
    assert syn.main(["--n", "30", "--seed", "2", "--steps", "16", "--mix", "ar=1,sines=2", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{out}: 30 trajectories x 16 steps")
    assert [line.split()[0] for line in lines[1:]] == ["ar", "sines"]  # one line per component present
    assert load(out).trajectories.shape == (30, 16, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["cli.h5"]  # no temporary file left behind
    with pytest.raises(SystemExit) as e:
        syn.main(["--help"])
    assert e.value.code == 0 and "kernelsynth" in capsys.readouterr().out


def test_gp_draws_have_the_rbf_kernels_covariance():
    x = np.arange(25) / 25
    length = 0.1
    closed_form = np.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * length ** 2))  # the independent reference
    cov = fam.kernel_matrix([("rbf", {"length_scale": length})], x)
    np.testing.assert_allclose(cov, closed_form, rtol=0, atol=1e-12)
    draws = fam.sample_gp(cov, 40000, np.random.default_rng(0))  # (25, 40000)
    empirical = draws @ draws.T / draws.shape[1]
    assert np.abs(empirical - closed_form).max() < 0.04  # standard error of an entry <= sqrt(2 / 40000) = 0.007


def test_batched_composition_matches_kernel_matrix():
    x = np.arange(-3, 12) / 12
    bank = np.stack([fam.kernel(name, x, **params) for name, params in fam.KERNEL_BANK])
    rng = np.random.default_rng(1)
    picks = rng.integers(0, len(fam.KERNEL_BANK), (30, fam.MAX_KERNELS))
    n_kernels, plus = rng.integers(1, fam.MAX_KERNELS + 1, 30), rng.random((30, fam.MAX_KERNELS)) < 0.5
    batched = fam.compose(bank, picks, n_kernels, plus)
    for i in range(30):
        k = n_kernels[i]
        one = fam.kernel_matrix([fam.KERNEL_BANK[j] for j in picks[i, :k]], x,
                                ["+" if p else "*" for p in plus[i, 1:k]])
        np.testing.assert_allclose(batched[i], one, rtol=1e-12, atol=1e-12)
    # Periodic kernel: period 0.25 of the grid's unit repeats exactly.
    periodic = fam.kernel("periodic", np.arange(8) / 8, period=0.25, length_scale=1.0)
    np.testing.assert_allclose(periodic[0, [0, 2, 4, 6]], 1.0)


@pytest.mark.parametrize("phi", [0.7, -0.5])
def test_ar1_lag1_autocorrelation_is_its_coefficient(phi):
    x = fam.sample_ar(np.full((40, 1), phi), 2000, np.random.default_rng(2))
    x = x - x.mean(axis=1, keepdims=True)
    r1 = (x[:, 1:] * x[:, :-1]).sum(axis=1) / (x * x).sum(axis=1)
    assert abs(r1.mean() - phi) < 0.02
    assert abs(x.var(axis=1).mean() - 1 / (1 - phi ** 2)) < 0.1 / (1 - phi ** 2)  # the stationary variance


def test_ar_coefficients_are_stationary():
    phi = fam.ar_coefficients(500, np.random.default_rng(3))
    for row in phi:
        poly = np.trim_zeros(np.r_[1.0, -row], "b")  # 1 - phi1 z - phi2 z^2 - phi3 z^3
        if len(poly) > 1:
            assert np.abs(np.roots(poly[::-1])).min() > 1.0  # every root outside the unit circle


def test_dominant_period_finds_a_sine_and_none_in_a_line():
    t = np.arange(100)
    x = np.stack([np.sin(2 * np.pi * t / 20), np.sin(2 * np.pi * t / 7) + 3, 0.5 * t])
    period = syn.dominant_period(x)
    assert period[0] == 20 and period[1] == 7 and np.isnan(period[2])


def test_the_file_loads_unchanged_and_encodes_as_llmtime(made):
    data, path = made
    loaded = load(path)  # the project's validating loader: /component is an extra dataset it ignores
    with h5py.File(path, "r") as f:
        assert set(f) == {"trajectories", "time", "component"}
    np.testing.assert_array_equal(loaded.trajectories, data.trajectories)
    np.testing.assert_array_equal(loaded.time, data.time)
    assert loaded.params is None and loaded.attrs["generator"] == "data.synthetic.generate"
    assert json.loads(loaded.attrs["components"]) == list(syn.COMPONENTS) and loaded.attrs["seed"] == 5
    for trajectory in loaded.trajectories:
        scaler = Scaler.fit(trajectory[:50])  # as training and the default forecast scale it
        text = encode(trajectory, scaler)
        values, report = decode(text, scaler, decimals=2)
        assert report.ok and values.shape == (100, 2)
        np.testing.assert_allclose(values, trajectory, rtol=0, atol=0.0051 * scaler.scale.max())


def test_predprey_holds_the_users_calibrated_prior_in_a_corner_of_a_broad_one():
    from data.lotka_volterra import PRIORS

    users = PRIORS["varied"]
    broad = {**fam.PREDPREY_LOG_RANGES, **fam.PREDPREY_RANGES}
    for key, (low, high) in users.items():
        assert broad[key][0] <= low and high <= broad[key][1], key  # the users' ranges inside
        assert broad[key][1] - broad[key][0] > high - low, key  # and the broad one wider
    x = syn.generate(600, seed=2, mix={"predprey": 1}).trajectories
    assert np.isfinite(x).all() and (x >= 0).all()
    period = syn.dominant_period(x[..., 0].astype(np.float64))
    in_users_band = (period >= 15) & (period <= 32)
    assert 0.2 < in_users_band.mean() < 0.8  # the users' periods are common, not all there is


def test_predprey_prior_text_reads_the_ranges_it_describes(monkeypatch):
    text = fam.predprey_prior_text()
    assert "rates 0.05-0.8," in text and "carrying capacity 3-40," in text and text.endswith("noise 0-3 %")
    # the model README's words follow the ranges, also where prey and predator differ
    monkeypatch.setitem(fam.PREDPREY_LOG_RANGES, "gamma", (0.07, 0.9))
    monkeypatch.setitem(fam.PREDPREY_RANGES, "noise", (0.0, 0.05))
    text = fam.predprey_prior_text()
    assert "rates 0.05-0.8 (prey) and 0.07-0.9 (predator)," in text and text.endswith("noise 0-5 %")
