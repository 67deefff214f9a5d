"""demo.py end to end on a small file: LoRA on the shipped lv-tiny, the test split forecast against every baseline,
the report; everything under --runs-dir, and the same numbers again with the same --seed."""
import json

import pytest

import demo
from data.lotka_volterra import save, simulate


def test_demo_on_a_users_file_is_complete_and_deterministic(tmp_path, capsys):
    data = tmp_path / "mine.h5"
    save(data, simulate(n=20, steps=100, seed=3))  # ordered split: 14 train, 3 val, trajectories 17-19 test
    runs = tmp_path / "runs"
    for _ in range(2):
        assert demo.main(["--data", str(data), "--runs-dir", str(runs), "--steps", "2"]) == 0, capsys.readouterr().err
    first, second = (json.loads((runs / name / "forecast" / "metrics.json").read_text()) for name in ("demo", "demo-2"))
    assert first["trajectories"] == [17, 18, 19] and first["data"] == str(data)
    assert set(first["metrics"]) == {"model", "persistence", "seasonal_naive", "lv_fit", "untrained"}
    assert first["protocol_settings"]["num_samples"] == 20  # the median of 20 samples is the point forecast
    assert first["metrics"] == second["metrics"]  # deterministic with --seed
    config = json.loads((runs / "demo" / "config.json").read_text())
    assert (config["rank"], config["ctx"], config["full"]) == (8, 768, False)
    assert config["model_dir"] == str(demo.LV_TINY)
    assert (runs / "report.md").is_file() and (runs / "demo" / "adapter").is_dir()
    assert "| zero-shot |" in (runs / "report.md").read_text()  # the untrained row next to the fine-tuned one
    assert not list(tmp_path.glob("*.json"))  # nothing written outside --runs-dir


def test_demo_refuses_a_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--data", str(tmp_path / "nope.h5"), "--runs-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "nope.h5: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--data", str(tmp_path), "--runs-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and f"--data {tmp_path}: a directory, not an h5 file" in capsys.readouterr().err
