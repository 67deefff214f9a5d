"""Data-parallel training: `torchrun --nproc_per_node 2 train.py` on CPU (gloo) follows the single-process run with
the same global batch, and only rank 0 writes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import write_small_data

from training import TrainConfig, read_metrics, read_run_config, train_run

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
# Failures of the local rendezvous itself (a port taken between being chosen and bound, a peer's socket reset while
# the group forms): the machine's, not the training's, so the launch is tried once more.
LAUNCH_ERRORS = ("address already in use", "eaddrinuse", "connection reset by peer", "connection refused",
                 "rendezvous", "socket timeout")


def run_torchrun(flags: list[str], attempts: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(attempts):
        done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "train.py", *flags],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        launch_failed = done.returncode != 0 and any(e in done.stderr.lower() for e in LAUNCH_ERRORS)
        if not launch_failed or attempt == attempts - 1:
            return done
        shutil.rmtree(flags[flags.index("--out") + 1], ignore_errors=True)  # a fresh start, not a resume


@pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun is not installed beside this Python")
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, mode):
    data = write_small_data(tmp_path / "lv20.h5", n=20)
    settings = dict(model="tiny", data=data, ctx=96, batch=4, steps=5, lr=1e-2, eval_every=2, val_batches=2,
                    warmup=1, grad_clip=1.0, device="cpu", runs_dir=str(tmp_path / "runs"))
    settings.update(full=True) if mode == "full" else settings.update(rank=4, targets=("q_proj", "v_proj", "o_proj"))
    single = train_run(TrainConfig(**settings, out=str(tmp_path / "runs" / "single")), progress=False)

    flags = ["--model", "tiny", "--data", data, "--ctx", "96", "--batch", "4", "--steps", "5", "--lr", "1e-2",
             "--eval-every", "2", "--val-batches", "2", "--warmup", "1", "--grad-clip", "1.0", "--device", "cpu",
             "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "runs" / "ddp")]
    flags += ["--full"] if mode == "full" else ["--rank", "4", "--targets", "q_proj,v_proj,o_proj"]
    done = run_torchrun(flags)
    assert done.returncode == 0, done.stderr[-3000:]

    ddp_dir = tmp_path / "runs" / "ddp"
    assert read_run_config(ddp_dir)["world_size"] == 2
    expected, got = read_metrics(single.run_dir), read_metrics(ddp_dir)
    assert [m["step"] for m in got] == [m["step"] for m in expected] == [0, 1, 2, 3, 4, 5]
    for mine, theirs in zip(got, expected):
        for key in ("train_loss", "val_loss", "grad_norm", "lr"):
            assert (mine[key] is None) == (theirs[key] is None), (mine, theirs)
            if mine[key] is not None:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (key, mine, theirs)
        assert mine["flops"] == theirs["flops"]
    assert got[-1]["train_loss"] < got[1]["train_loss"] - 0.1  # it trained, not just matched at the start

    if mode == "full":
        weights = load_file(str(ddp_dir / "model" / "model.safetensors"))
        trained = {k: v for k, v in single.model.state_dict().items() if k in weights}
    else:
        weights = load_file(str(ddp_dir / "adapter" / "adapter_model.safetensors"))
        trained = {"base_model.model." + k: v for k, v in single.model.state_dict().items() if ".lora_" in k}
    assert sorted(weights) == sorted(trained)
    # Summation order differs between one batch of 4 and two of 2; AdamW divides each gradient by its own running
    # scale, so round-off in a near-zero gradient can move that weight by a sizeable fraction of lr (1e-2).
    for name, value in trained.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-3, atol=1e-4)
    # Rank 1 wrote nothing: one metrics line per step, not two.
    assert len((ddp_dir / "metrics.jsonl").read_text().splitlines()) == 6
