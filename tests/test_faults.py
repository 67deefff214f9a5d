"""Faults, as a hostile user or a bad day would cause them (issue 14): no run can corrupt another, non-finite numbers
stop the work, every bad input gets one clear line.

Each case checks the exit status, that the user sees exactly one line from the command (progress bars aside) and no
traceback, and that every file that existed before is unchanged or consistently extended. Two processes on one run
directory, kill -9 in the middle of a write and SIGTERM run in real subprocesses; the rest in-process through the
same `main` the scripts call. A full disk is simulated (OSError ENOSPC from the write), never caused.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import flops as flops_cli
import forecast
import forecasting.cli
import lora
import training.loop
import training.setup
from common.exit_codes import EXIT_DIVERGED, EXIT_FAILED, EXIT_USAGE
from common.fileio import FileLock, LockHeld
from data.lotka_volterra import DataError, load, save, simulate
from forecasting.source import from_run
from ledger import read_record
from ledger.ledger import LOCK_NAME as LEDGER_LOCK
from qwen_mini import Qwen, QwenConfig, char_tokenizer, from_pretrained, generate, save_pretrained
from qwen_mini.generate import NonFiniteLogits
from qwen_mini.loading import CheckpointError
from training import RunDirError, TrainConfig, read_metrics, read_run_config, train_run
from training.cli import main
from training.grid import resumed_runs
from training.stopping import Interrupted, StopSignals, TrainingDiverged

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--ctx", "64", "--batch", "2", "--val-batches", "1", "--eval-every", "100"]


# ---- helpers -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "lv20.h5"
    save(path, simulate(n=20, seed=1))
    return str(path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data) -> Path:
    """A finished 3-step LoRA run (checkpoints at every step); tests that damage it work on a copy."""
    runs = tmp_path_factory.mktemp("finished") / "runs"
    status = main([*TINY, "--data", data, "--steps", "3", "--checkpoint-every", "1", "--runs-dir", str(runs),
                   "--out", str(runs / "done")])
    assert status == 0
    return runs / "done"


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "runs" / run.name
    shutil.copytree(run, target)
    return target


def train(capsys, *argv) -> tuple[int, list[str]]:
    """train.py in-process: (exit status, the lines it wrote to stderr other than progress bars)."""
    status = main([str(a) for a in argv])
    return status, lines_of(capsys.readouterr().err)


def lines_of(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.strip() and not is_progress(line)]


PROGRESS_LINE = re.compile(r"^[^:]*: \d+/(\d+|\?) \S+( \(\d+ %\))?, \d+ s")


def is_progress(line: str) -> bool:
    """A tqdm bar on a terminal, or common.progress's plain line in a log."""
    return "%|" in line or PROGRESS_LINE.match(line) is not None


def flags(run: Path, data: str, *more) -> list:
    return [*TINY, "--data", data, "--runs-dir", run.parent, "--out", run, *more]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file's bytes, but an atomic write's temporary file (`.<name>.<random>.tmp`, common.fileio): a snapshot
    taken while a process writes would otherwise hold a file that is renamed away a moment later."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".tmp"))}


def assert_kept(before: dict[str, bytes], directory: Path, extended=()) -> None:
    """Every file of `before` still there: byte for byte, or (for `extended`) with the old bytes as its prefix; the
    ledger record may be rewritten but never forgets spending. (run.lock names whichever process last held it.)"""
    for name, old in before.items():
        new = (directory / name).read_bytes()
        if name == "run.lock":
            continue
        if name == "flops.json":
            assert json.loads(new)["flops_used"] >= json.loads(old)["flops_used"]
        elif name in extended:
            assert new.startswith(old), name
        else:
            assert new == old, name
    assert not list(directory.rglob(".*.tmp"))


def checkpoint_step(run: Path) -> int:
    return int(torch.load(run / "checkpoint.pt", weights_only=True)["step"])


def steps_logged(run: Path) -> list[int]:
    return [row["step"] for row in read_metrics(run)]


def fail_if_loaded(monkeypatch) -> None:
    """Any model load is a test failure: refusals must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")
    monkeypatch.setattr(training.setup, "load_model_and_tokenizer", refuse)


def start_train(run: Path, data: str, *more, driver: str = "") -> subprocess.Popen:
    """train.py in its own process; `driver`: Python run before train.py's main (it patches what the fault needs)."""
    code = f"import sys\n{textwrap.dedent(driver)}\nfrom training.cli import main\nsys.exit(main(sys.argv[1:]))"
    argv = [str(a) for a in flags(run, data, *more)]
    return subprocess.Popen([sys.executable, "-c", code, *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_step(run: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if (run / "metrics.jsonl").is_file() and max(steps_logged(run), default=-1) >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"{run} did not reach step {step}")


# ---- 1. two processes on one run directory -------------------------------------------------------------------------

def test_a_second_process_is_refused_at_once_and_sigterm_stops_the_first_at_a_checkpoint(tmp_path, data, capsys):
    run = tmp_path / "runs" / "shared"
    first = start_train(run, data, "--steps", "100000", "--checkpoint-every", "0")
    try:
        wait_for_step(run, 1, first)
        first.send_signal(signal.SIGSTOP)  # frozen: whatever changes now is the second process's doing
        before = snapshot(run)
        holder = json.loads(before["run.lock"])
        status, lines = train(capsys, *flags(run, data, "--steps", "5", "--lr", "1"))  # this process: the second
        assert status == EXIT_FAILED
        assert lines == [f"train.py: error: {run} is in use by pid {first.pid} on host {socket.gethostname()} since "
                         f"{holder['since']} (train.py {run}): wait for that run to end (or stop it), or choose "
                         "another --out"]
        assert snapshot(run) == before
        first.send_signal(signal.SIGCONT)
        first.send_signal(signal.SIGTERM)  # what schedulers and `timeout` send
        _, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 143
    step = steps_logged(run)[-1]
    assert lines_of(stderr) == [f"train.py: stopped by SIGTERM after step {step}, with a checkpoint there; to "
                                "continue, run the same command with --resume"]
    assert checkpoint_step(run) == step
    assert_kept(before, run, extended=("metrics.jsonl",))
    status, lines = train(capsys, *flags(run, data, "--steps", str(step + 1), "--checkpoint-every", "0", "--resume"))
    assert status == 0 and lines == [] and steps_logged(run) == list(range(step + 2))


# ---- 2. non-finite numbers -----------------------------------------------------------------------------------------

def test_an_infinite_gradient_stops_training_at_step_1_saving_nothing_of_it(tmp_path, data, capsys):
    run = tmp_path / "runs" / "nan"
    status, lines = train(capsys, *flags(run, data, "--steps", "3", "--lr", "1", "--alpha", "1e38", "--grad-clip", "0"))
    assert status == EXIT_DIVERGED and len(lines) == 1
    assert lines[0].startswith(f"train.py: error: {run}: non-finite numbers at step 1 (training loss ")
    assert "gradient norm inf); training stopped there, saving nothing of it, and it had written no checkpoint yet. " \
           "Lower --lr (or --alpha)" in lines[0]
    assert steps_logged(run) == [0]
    assert not (run / "checkpoint.pt").exists() and not (run / "adapter").exists()


class PoisonedAdamW(torch.optim.AdamW):
    """AdamW whose second step leaves a NaN in the weights (finite loss and gradients before it)."""
    steps = 0

    def step(self, closure=None):
        result = super().step(closure)
        PoisonedAdamW.steps += 1
        if PoisonedAdamW.steps == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result


def test_weights_gone_non_finite_are_never_checkpointed(tmp_path, data, monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", PoisonedAdamW)
    run = tmp_path / "runs" / "poisoned"
    config = TrainConfig(model="tiny", data=data, ctx=64, batch=2, val_batches=1, steps=4, checkpoint_every=1,
                         eval_every=100, out=str(run), runs_dir=str(run.parent))
    seen = {}
    hook = (lambda step, entry: seen.setdefault("checkpoint", (run / "checkpoint.pt").read_bytes()) if step == 2
            else None)
    with pytest.raises(TrainingDiverged, match=r"non-finite numbers at step 2 \(weights holding NaN or infinity "
                                               r"after the optimizer step\).*its newest checkpoint \(step 1\) is kept"):
        train_run(config, hooks=[hook], progress=False)
    assert (run / "checkpoint.pt").read_bytes() == seen["checkpoint"] and checkpoint_step(run) == 1
    assert not (run / "adapter").exists()


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_an_infinite_or_nan_validation_loss_stops_training(tmp_path, data, monkeypatch, bad):
    """Infinity is as non-finite as NaN (issue 26: a guard written as isnan lets an infinite validation loss through
    into metrics.jsonl, where the run selection would have to skip it)."""
    monkeypatch.setattr(training.loop, "validation_losses", lambda *args, **kwargs: (bad, {}))
    run = tmp_path / "runs" / "inf_val"
    config = TrainConfig(model="tiny", data=data, ctx=64, batch=2, val_batches=1, steps=2, checkpoint_every=1,
                         eval_every=1, out=str(run), runs_dir=str(run.parent))
    with pytest.raises(TrainingDiverged, match=rf"non-finite numbers at step 0 \(validation loss {bad}\)"):
        train_run(config, progress=False)
    assert not (run / "checkpoint.pt").exists() and not (run / "adapter").exists()


def test_a_model_with_non_finite_weights_is_refused_naming_the_tensor(tmp_path):
    model = Qwen(QwenConfig.from_name("tiny"))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("-inf")
    save_pretrained(model, tmp_path / "model")
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' holds 1 non-finite "
                                              r"value\(s\) \(e.g. -inf at \[3, 5\]\)"):
        from_pretrained(tmp_path / "model")


def test_a_run_whose_adapter_holds_nan_is_refused_by_forecast(tmp_path, finished, capsys):
    run = copy_run(finished, tmp_path)
    weights = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[1]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, weights)
    status = forecast.main(["--run", str(run), "--limit", "1", "--no-baselines", "--quiet"])
    assert status == EXIT_USAGE
    assert lines_of(capsys.readouterr().err) == [
        f"error: {weights}: tensor {name!r} holds 1 non-finite value(s) (e.g. nan at [0, 0]); the file is damaged or "
        "was saved from a run that diverged"]
    assert not (run / "forecast").exists()


def test_resuming_from_a_checkpoint_holding_nan_is_refused_naming_the_tensor(tmp_path, finished, data, capsys):
    run = copy_run(finished, tmp_path)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    name = sorted(state["trainable"])[0]
    state["trainable"][name].view(-1)[0] = float("inf")
    torch.save(state, run / "checkpoint.pt")
    before = snapshot(run)
    status, lines = train(capsys, *flags(run, data, "--steps", "4", "--checkpoint-every", "1", "--resume"))
    assert status == EXIT_FAILED
    assert lines == [f"train.py: error: {run / 'checkpoint.pt'}: tensor {name!r} holds 1 non-finite value(s) (e.g. "
                     "inf at [0, 0]); the file is damaged or was saved from a run that diverged"]
    assert_kept(before, run)


def huge_model(directory: Path) -> Path:
    """Finite weights whose logits overflow: the final norm's weight at 3e38."""
    model = Qwen(QwenConfig.from_name("tiny"))
    with torch.no_grad():
        model.model.norm.weight.fill_(3e38)
    save_pretrained(model, directory)
    char_tokenizer().save_pretrained(directory)
    return directory


def test_generation_and_forecast_stop_on_non_finite_logits(tmp_path, data, capsys):
    model = huge_model(tmp_path / "huge")
    with pytest.raises(NonFiniteLogits, match="non-finite logits at generated token 0"):
        generate(from_pretrained(model), torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    out = tmp_path / "runs" / "forecasts" / "huge"
    status = forecast.main(["--model", str(model), "--data", data, "--limit", "1", "--no-baselines", "--quiet",
                            "--runs-dir", str(tmp_path / "runs"), "--out", str(out)])
    lines = lines_of(capsys.readouterr().err)
    assert status == EXIT_FAILED
    assert lines[-1] == (f"error: {model}: non-finite logits at generated token 0: the model's weights or activations "
                         "hold NaN or infinity, so whatever it wrote would be meaningless")
    assert not (out / "metrics.json").exists()


# ---- 3. --resume: not too forgiving, not too strict ----------------------------------------------------------------

def test_resume_refuses_a_run_whose_checkpoint_was_deleted(tmp_path, finished, data, capsys):
    run = copy_run(finished, tmp_path)
    (run / "checkpoint.pt").unlink()
    before = snapshot(run)
    status, lines = train(capsys, *flags(run, data, "--steps", "3", "--checkpoint-every", "1", "--resume"))
    assert status == EXIT_FAILED
    assert lines == [f"train.py: error: {run}: --resume found no checkpoint.pt, but the run wrote one at step 1 "
                     "(metrics.jsonl goes to step 3): it was deleted or moved; starting again at step 0 would "
                     "overwrite that history. Put the checkpoint back, or train again with another --out"]
    assert_kept(before, run)


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_it_again(tmp_path, finished, data, capsys):
    run = copy_run(finished, tmp_path)
    # As if it had been a 10-step run checkpointing every 5 steps, stopped after step 3: no checkpoint was due yet.
    (run / "checkpoint.pt").unlink()
    config = read_run_config(run)
    (run / "config.json").write_text(json.dumps({**config, "steps": 10, "checkpoint_every": 5}))
    status, lines = train(capsys, *flags(run, data, "--steps", "3", "--checkpoint-every", "5", "--resume"))
    assert status == 0 and steps_logged(run) == [0, 1, 2, 3] and checkpoint_step(run) == 3


def test_resume_refuses_a_mistyped_directory_and_creates_nothing(tmp_path, finished, data, capsys):
    typo = finished.parent / "dnoe"
    status, lines = train(capsys, *flags(typo, data, "--steps", "3", "--resume"))
    assert status == EXIT_FAILED and not typo.exists()
    assert lines == [f"train.py: error: {typo}: --resume found no such directory; check the path, or leave out "
                     "--resume to start a new run"]
    empty = tmp_path / "runs" / "empty"
    empty.mkdir(parents=True)
    status, lines = train(capsys, *flags(empty, data, "--steps", "3", "--resume"))
    assert status == EXIT_FAILED and list(empty.iterdir()) == []
    assert lines[0].startswith(f"train.py: error: {empty}: --resume found no run in it (none of config.json, ")


KILL_IN_METRICS_LINE = """
    import os, signal
    real_write = os.write
    def write(fd, data):
        if data.startswith(b'{"step": 3,'):  # half of step 3's metrics line, then kill -9
            real_write(fd, data[:len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(fd, data)
    os.write = write
"""


def test_kill_9_in_the_middle_of_a_metrics_line_resumes_dropping_the_torn_line(tmp_path, data, capsys):
    run = tmp_path / "runs" / "torn"
    settings = ["--steps", "4", "--checkpoint-every", "2"]
    killed = start_train(run, data, *settings, driver=KILL_IN_METRICS_LINE)
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    torn = (run / "metrics.jsonl").read_text()
    assert not torn.endswith("\n") and torn.splitlines()[-1].startswith('{"step": 3,')
    assert checkpoint_step(run) == 2 and not list(run.glob(".*.tmp"))
    before = snapshot(run)
    status, lines = train(capsys, *flags(run, data, *settings, "--resume"))
    assert status == 0 and len(lines) == 2
    assert lines[0].startswith(f"train.py: note: {run} was last locked by pid {killed.pid} on host ")
    assert lines[0].endswith(f"(train.py {run}), which ended without releasing it (a crash or kill -9); taken over")
    assert lines[1].startswith(f"warning: {run / 'metrics.jsonl'}:4: dropped the last line, cut short by a process "
                               "that stopped while writing it: '{\"step\": 3,")
    assert steps_logged(run) == [0, 1, 2, 3, 4] and checkpoint_step(run) == 4
    whole_lines = before["metrics.jsonl"].decode().splitlines()[:3]
    assert (run / "metrics.jsonl").read_text().splitlines()[:3] == whole_lines


def test_a_bad_line_that_is_not_the_last_is_refused(tmp_path, finished, data, capsys):
    run = copy_run(finished, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = snapshot(run)
    status, errors = train(capsys, *flags(run, data, "--steps", "4", "--checkpoint-every", "1", "--resume"))
    assert status == EXIT_FAILED and len(errors) == 1
    assert errors[0].startswith(f"train.py: error: {run / 'metrics.jsonl'}:2: not a JSON line (")
    assert_kept(before, run)


def test_a_truncated_checkpoint_says_what_is_wrong_and_what_to_do(tmp_path, finished, data, capsys):
    run = copy_run(finished, tmp_path)
    checkpoint = run / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    before = snapshot(run)
    status, lines = train(capsys, *flags(run, data, "--steps", "4", "--checkpoint-every", "1", "--resume"))
    assert status == EXIT_FAILED
    assert lines == [f"train.py: error: {checkpoint}: damaged checkpoint (5000 bytes that are not a whole checkpoint "
                     "(the end of its zip archive is missing: truncated or overwritten)); the run cannot continue "
                     "from it: put back a good copy of the file, or train again with another --out"]
    assert_kept(before, run)


KILL_IN_CHECKPOINT = """
    import os, signal, torch
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 2:  # part of the step-2 checkpoint, then kill -9
            f.write(b"PK\\x03\\x04" + bytes(1000))
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
"""


def test_kill_9_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, data, capsys):
    run = tmp_path / "runs" / "killed"
    settings = ["--steps", "3", "--checkpoint-every", "1"]
    killed = start_train(run, data, *settings, driver=KILL_IN_CHECKPOINT)
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert checkpoint_step(run) == 1 and len(list(run.glob(".checkpoint.pt.*.tmp"))) == 1
    before = {name: content for name, content in snapshot(run).items() if not name.endswith(".tmp")}
    status, lines = train(capsys, *flags(run, data, *settings, "--resume"))
    assert status == 0 and steps_logged(run) == [0, 1, 2, 3] and checkpoint_step(run) == 3
    assert not list(run.glob(".*.tmp"))  # the killed process's half file is cleaned up
    assert (run / "metrics.jsonl").read_bytes().startswith(b"".join(
        line + b"\n" for line in before["metrics.jsonl"].splitlines()[:2]))


# ---- 4. settings the model or the data cannot serve -----------------------------------------------------------------

def test_settings_the_model_or_data_cannot_serve_are_refused_before_loading(tmp_path, data, monkeypatch, capsys):
    fail_if_loaded(monkeypatch)
    run = tmp_path / "runs" / "r"
    status, lines = train(capsys, *flags(run, data, "--ctx", "100000"))
    assert status == EXIT_USAGE and lines == [
        "train.py: error: --ctx 100000 is more than the 4096 positions tiny supports (max_position_embeddings in its "
        "config.json)"]
    short = tmp_path / "short.h5"
    save(short, simulate(n=20, steps=30, seed=1))
    status, lines = train(capsys, *flags(run, str(short)))
    assert status == EXIT_USAGE and lines == [
        f"train.py: error: {short}: its trajectories have 30 steps; training needs at least 50 (each trajectory's "
        "LLMTIME scaler is fitted on its first 50, the forecast context)"]
    with pytest.raises(SystemExit) as usage:
        main([str(a) for a in flags(run, data, "--ctx", "1")])
    assert usage.value.code == EXIT_USAGE
    assert lines_of(capsys.readouterr().err)[-1] == ("train.py: error: ctx must be >= 2 (the loss predicts token t+1 "
                                                     "from tokens <= t), got 1")
    assert not run.exists()


# ---- 5. outputs that cannot be written -----------------------------------------------------------------------------

def test_an_out_that_names_a_file_is_refused_before_loading(tmp_path, data, monkeypatch, capsys):
    fail_if_loaded(monkeypatch)
    target = tmp_path / "runs" / "notes.txt"
    target.parent.mkdir()
    target.write_text("precious\n")
    status, lines = train(capsys, *flags(target, data))
    assert status == EXIT_FAILED
    assert lines == [f"train.py: error: cannot write the run directory: {target}: exists and is not a directory"]
    assert target.read_text() == "precious\n"


def test_an_out_on_a_read_only_mount_is_refused_before_loading(tmp_path, data, monkeypatch, capsys):
    fail_if_loaded(monkeypatch)
    read_only = tmp_path / "runs" / "ro"
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):  # what a read-only mount answers
        if Path(path).is_relative_to(read_only):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)
    monkeypatch.setattr(os, "mkdir", mkdir)
    status, lines = train(capsys, *flags(read_only / "r", data))
    assert status == EXIT_FAILED
    assert lines == [f"train.py: error: cannot write the run directory: {read_only / 'r'}: read-only file system"]


def full_disk_at(monkeypatch, run: Path, seen: dict, target: str, step: int) -> None:
    """OSError ENOSPC when `target` ("metrics" or "checkpoint") of `step` is written, after part of it reached the
    file; `seen` gets the run directory's files as they were just before."""
    def no_space(written):
        seen.update(snapshot(run))
        written()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if target == "metrics":
        real_write = os.write
        monkeypatch.setattr(os, "write", lambda fd, data: no_space(lambda: real_write(fd, data[:10]))
                            if data.startswith(b'{"step": %d,' % step) else real_write(fd, data))
    else:
        real_save = torch.save
        monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: no_space(lambda: f.write(b"PK\x03\x04" * 100))
                            if isinstance(obj, dict) and obj.get("step") == step else real_save(obj, f, *a, **k))


@pytest.mark.parametrize("target, kept_step, logged", [("metrics", 2, 2), ("checkpoint", 2, 4)])
def test_a_full_disk_stops_the_run_with_one_line_keeping_checkpoint_and_metrics(tmp_path, data, monkeypatch, capsys,
                                                                                target, kept_step, logged):
    run = tmp_path / "runs" / target
    seen = {}
    full_disk_at(monkeypatch, run, seen, target, 3 if target == "metrics" else 4)
    settings = ["--steps", "4", "--checkpoint-every", "2"]
    status, lines = train(capsys, *flags(run, data, *settings))
    name = "metrics.jsonl" if target == "metrics" else "checkpoint.pt"
    assert status == EXIT_FAILED
    assert lines == [f"train.py: error: {run / name}: no space left on device; the run stopped after step {logged}: "
                     f"its newest checkpoint (step {kept_step}) is kept, and metrics.jsonl ends with a whole line. "
                     "Make room (or fix the directory), then continue with --resume"]
    assert_kept({k: v for k, v in seen.items() if not k.endswith(".tmp")}, run)
    assert steps_logged(run) == list(range(logged + 1)) and checkpoint_step(run) == kept_step
    record = json.loads((run / "flops.json").read_text())
    assert record["train"]["step"] == logged and record["reservations"] == []
    monkeypatch.undo()
    status, _ = train(capsys, *flags(run, data, *settings, "--resume"))
    assert status == 0 and steps_logged(run) == list(range(5))


# ---- 6. SIGTERM (the first test sends it to a real process) --------------------------------------------------------

def test_sigterm_stops_a_forecast_with_one_line(tmp_path, data, monkeypatch, capsys):
    monkeypatch.setattr(forecasting.cli, "budgeted_evaluate",
                        lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGTERM))
    out = tmp_path / "runs" / "forecasts" / "tiny"
    status = forecast.main(["--model", "tiny", "--data", data, "--limit", "1", "--quiet", "--runs-dir",
                            str(tmp_path / "runs"), "--out", str(out)])
    assert status == 143
    assert lines_of(capsys.readouterr().err)[-1] == "error: stopped by SIGTERM; nothing was written"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_first_signal_is_deferred_to_the_step_boundary_and_a_second_stops_at_once():
    with StopSignals() as stop:
        with pytest.raises(Interrupted) as outside:  # before the step loop: at once, as Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
        assert outside.value.exit_status == 130 and stop.signum is None
        stop.deferring = True
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        with pytest.raises(Interrupted) as again:
            os.kill(os.getpid(), signal.SIGINT)
        assert again.value.checkpoint_step is None
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the previous handlers are back


# ---- 7. the data file changing under a run -------------------------------------------------------------------------

def test_a_replaced_data_file_is_refused_on_resume_and_warned_about_by_forecast(tmp_path, capsys):
    data = tmp_path / "lv.h5"
    save(data, simulate(n=20, seed=1))
    run = tmp_path / "runs" / "r"
    status, _ = train(capsys, *flags(run, str(data), "--steps", "1"))
    assert status == 0 and read_run_config(run)["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    save(data, simulate(n=20, seed=2))  # same shape, other trajectories
    before = snapshot(run)
    status, lines = train(capsys, *flags(run, str(data), "--steps", "2", "--resume"))
    assert status == EXIT_FAILED and len(lines) == 1
    assert lines[0].startswith(f"train.py: error: {run}: the data file {data} changed since the run started (sha256 ")
    assert lines[0].endswith("now); resuming needs the data it trained on: put that file back, or start a new run "
                             "with another --out")
    assert_kept(before, run)
    source = from_run(run)
    assert any(note.startswith(f"{data} changed since run {run} trained on it") for note in source.notes)


# ---- 8. messages that say what is wrong ----------------------------------------------------------------------------

def test_h5_faults_are_named_for_what_they_are(tmp_path):
    with pytest.raises(DataError, match=f"^{tmp_path}: is a directory, not an h5 file$"):
        load(tmp_path)
    grouped = tmp_path / "grouped.h5"
    with h5py.File(grouped, "w") as f:
        f.create_group("trajectories").create_dataset("0", data=np.ones((10, 2)))
        f.create_dataset("time", data=np.arange(10.0))
    with pytest.raises(DataError, match=f"^{grouped}: /trajectories is a group, expected a dataset of numbers$"):
        load(grouped)


def test_a_data_file_of_the_wrong_shape_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    fail_if_loaded(monkeypatch)
    flat = tmp_path / "flat.h5"
    with h5py.File(flat, "w") as f:
        f.create_dataset("trajectories", data=np.ones(60))
        f.create_dataset("time", data=np.arange(60.0))
    status, lines = train(capsys, *flags(tmp_path / "runs" / "r", str(flat)))
    assert status == EXIT_FAILED
    assert lines == [f"train.py: error: {flat}: /trajectories has shape (60,), expected (N, T, 2)"]


# ---- found on the way ----------------------------------------------------------------------------------------------

def test_an_adapter_config_with_a_nan_alpha_is_refused(tmp_path, finished):
    adapter = copy_run(finished, tmp_path) / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": float("nan")}))
    with pytest.raises(lora.AdapterError, match="lora_alpha must be a finite number, got nan"):
        lora.load_adapter(Qwen(QwenConfig.from_name("tiny")), adapter)


def test_forecast_refuses_an_out_it_cannot_write_before_forecasting(tmp_path, finished, capsys):
    target = tmp_path / "result.txt"
    target.write_text("keep\n")
    status = forecast.main(["--run", str(finished), "--limit", "1", "--no-baselines", "--quiet", "--out", str(target)])
    assert status == EXIT_USAGE and target.read_text() == "keep\n"
    assert lines_of(capsys.readouterr().err)[-1] == (f"error: cannot write the output: {target}: exists and is not a "
                                                     "directory")


def test_grid_resume_needs_the_grid_directory_and_starts_the_runs_that_never_did(tmp_path, finished):
    grid = tmp_path / "grid"
    configs = [TrainConfig(model="tiny", lr=lr, resume=True, out=str(grid / f"run{lr:g}")) for lr in (1e-3, 2e-3)]
    with pytest.raises(RunDirError, match=f"{grid}: --resume found no such grid directory"):
        resumed_runs(configs)
    shutil.copytree(finished, grid / "run0.001")
    assert resumed_runs(configs) == [True, False]


def test_a_run_refused_by_the_budget_leaves_no_directory_behind(tmp_path, data, capsys):
    runs = tmp_path / "runs"
    status, lines = train(capsys, *TINY, "--data", data, "--runs-dir", runs, "--out", runs / "deep" / "r",
                          "--max-flops", "1000")
    assert status == 3 and len(lines) == 1 and lines[0].startswith("train.py: refused by the FLOP budget: ")
    assert not (runs / "deep").exists()


def freeze_outside_the_ledger_lock(process: subprocess.Popen, runs: Path) -> None:
    """SIGSTOP `process` at a moment it does not hold the ledger's lock (it takes it for milliseconds per booking),
    so what runs next cannot wait on a frozen holder."""
    for _ in range(200):
        process.send_signal(signal.SIGSTOP)
        try:
            FileLock(runs / LEDGER_LOCK).release()
            return
        except LockHeld:
            process.send_signal(signal.SIGCONT)
            time.sleep(0.02)
    raise AssertionError("the run never let go of the ledger's lock")


def test_a_resumed_run_holds_its_lock_against_a_second_writer_and_settle(tmp_path, finished, data, capsys):
    """A run continued with --resume is as locked as a fresh one (issue 26): while it trains, a second train.py on
    its directory is refused naming it, and `flops.py --settle` keeps its reservation (and so the cap) in place."""
    run = copy_run(finished, tmp_path)
    first = start_train(run, data, "--steps", "100000", "--checkpoint-every", "0", "--resume")
    try:
        wait_for_step(run, 4, first)  # past the checkpoint it resumed from (step 3)
        freeze_outside_the_ledger_lock(first, run.parent)
        # (--steps 3, where its checkpoint is: were it let in, it would end at once rather than train on)
        status, lines = train(capsys, *flags(run, data, "--steps", "3", "--checkpoint-every", "0", "--resume"))
        assert status == EXIT_FAILED and len(lines) == 1
        assert lines[0].startswith(f"train.py: error: {run} is in use by pid {first.pid} on host ")
        assert flops_cli.main(["--runs", str(run.parent), "--settle"]) == 0
        assert "settled: no reservation of a finished process was left" in capsys.readouterr().out
        (reservation,) = read_record(run / "flops.json").reservations
        assert reservation["pid"] == first.pid and reservation["flops"] > reservation["spent"]
        first.send_signal(signal.SIGCONT)
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 143
    assert read_record(run / "flops.json").reservations == []  # settled by the run itself as it stopped
