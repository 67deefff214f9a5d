"""--dtype float16: fp16 autocast over float32 weights with dynamic loss scaling (train.py), fp16 autocast over float32
weights (forecast.py), the one resolver of --dtype (`common.devices.dtype_from_flag`) and its refusals."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import PARITY_CONFIGS, hf_reference, left_padded_batch, write_checkpoint
from test_train import Killed, comparable, kill_after, tiny_config, write_small_data

import training.setup
from common.devices import dtype_from_flag
from training import TrainConfig, read_metrics, train_run
from training.setup import resolve_precision
from training.stopping import TrainingDiverged

CPU, MPS, CUDA = torch.device("cpu"), torch.device("mps"), torch.device("cuda")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    return write_small_data(tmp_path_factory.mktemp("data") / "lv40.h5")


# ---- the resolver ---------------------------------------------------------------------------------------------------

def test_auto_resolves_to_float32_on_cpu_and_mps_and_by_bf16_support_on_cuda(monkeypatch):
    assert dtype_from_flag("auto", CPU) == "float32"
    assert dtype_from_flag("auto", MPS) == "float32"
    for name in ("float32", "bfloat16", "float16"):
        assert dtype_from_flag(name, CPU) == name
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert dtype_from_flag("auto", CUDA) == "bfloat16"
    # An older GPU (before Ampere): emulated bf16 does not count, auto takes float16.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert dtype_from_flag("auto", CUDA) == "float16"


def test_bfloat16_on_mps_is_refused_in_one_line_by_every_tool(capsys):
    with pytest.raises(ValueError, match=r"^--dtype bfloat16 is not supported on mps .*use --dtype float16 or "
                                         r"float32$"):
        dtype_from_flag("bfloat16", MPS)
    assert dtype_from_flag("float16", MPS) == "float16" and dtype_from_flag("float32", MPS) == "float32"
    with pytest.raises(training.setup.ConfigError, match="bfloat16 is not supported on mps"):  # train.py: exit 2
        resolve_precision(TrainConfig(model="tiny", dtype="bfloat16"), MPS)
    from forecasting.source import parse_dtype
    with pytest.raises(ValueError, match="bfloat16 is not supported on mps"):
        parse_dtype("bfloat16", MPS)
    from bench.bench import main as bench_main
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--device", "mps", "--dtype", "bfloat16"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: --dtype bfloat16 is not supported on mps (Apple GPUs); use --dtype float16 or float32")


def test_float16_precision_is_autocast_over_float32_weights_with_loss_scaling():
    for full in (False, True):
        precision = resolve_precision(TrainConfig(model="tiny", dtype="float16", full=full), CPU)
        assert precision.frozen_dtype == torch.float32 and precision.autocast_dtype == torch.float16
        assert precision.grad_scaler(CPU).is_enabled()
    assert not resolve_precision(TrainConfig(model="tiny", dtype="bfloat16"), CPU).grad_scaler(CPU).is_enabled()
    assert resolve_precision(TrainConfig(model="tiny", dtype="auto"), CPU).autocast_dtype is None


# ---- training -------------------------------------------------------------------------------------------------------
# Tolerance of float16 against float32: one float16 step (ulp) at the loss's size, 2**-9 ~ 2e-3 at losses of 2-4.
# Measured on this CPU over 6 LoRA steps (lr 1e-2): max |loss difference| 3.4e-5, with no step skipped; a step that
# lost its update (skipped, or lost to an unscaling bug) moves the following losses by ~3e-2 here, 15x the tolerance.
FP16_LOSS_TOLERANCE = 2.0 ** -9


def test_float16_training_follows_float32_within_one_float16_step(tmp_path, small_data):
    runs = {dtype: train_run(tiny_config(tmp_path / dtype, small_data, dtype=dtype, eval_every=3), progress=False)
            for dtype in ("float32", "float16")}
    fp32, fp16 = ([m for m in run.metrics if m["step"] > 0] for run in runs.values())
    differences = [abs(a["train_loss"] - b["train_loss"]) for a, b in zip(fp32, fp16)]
    differences += [abs(a["val_loss"] - b["val_loss"]) for a, b in zip(fp32, fp16) if a["val_loss"] is not None]
    print(f"float16 vs float32: max |loss difference| {max(differences):.2e}")
    assert 0 < max(differences) <= FP16_LOSS_TOLERANCE  # > 0: fp16 autocast really ran
    assert [m["skipped"] for m in fp16] == [False] * 6 and fp16[-1]["skipped_steps"] == 0
    assert [m["skipped_steps"] for m in fp32] == [0] * 6  # every run's lines carry the keys


def scaler_starting_at(scale: float):
    def grad_scaler(self, device):
        return torch.amp.GradScaler(device.type, init_scale=scale, enabled=self.loss_scaling)
    return grad_scaler


def test_overflow_steps_are_skipped_counted_and_resumed_with_their_loss_scale(tmp_path, small_data, monkeypatch):
    # A loss scale of 2**22 overflows float16's gradients of the tiny model (2**19 does not, measured): the first
    # steps are skipped, each halving the scale, then training goes on. The resumed run continues from a checkpoint
    # taken mid-way (scale 2**20): had it not restored the scale, it would skip more steps and not match.
    monkeypatch.setattr(training.setup.Precision, "grad_scaler", scaler_starting_at(2.0 ** 22))
    settings = dict(dtype="float16", steps=6, eval_every=100, checkpoint_every=2)
    whole = train_run(tiny_config(tmp_path / "whole", small_data, **settings), progress=False)
    steps = [m for m in whole.metrics if m["step"] > 0]
    skipped = [m["skipped"] for m in steps]
    print("skipped:", skipped)
    assert skipped[0] and not skipped[-1]  # overflow at first, training at the end
    assert [m["skipped_steps"] for m in steps] == [sum(skipped[:i + 1]) for i in range(6)]
    assert all((m["grad_norm"] is None) == m["skipped"] for m in steps)
    assert all(math.isfinite(m["train_loss"]) for m in steps) and math.isfinite(steps[-1]["val_loss"])
    state = torch.load(whole.run_dir / "checkpoint.pt", weights_only=True)
    assert state["skipped_steps"] == sum(skipped) and state["grad_scaler"]["scale"] == 2.0 ** (22 - sum(skipped))

    stopped = tiny_config(tmp_path / "stopped", small_data, **settings)
    with pytest.raises(Killed):
        train_run(stopped, hooks=[kill_after(3)], progress=False)
    resumed = train_run(tiny_config(tmp_path / "stopped", small_data, resume=True, **settings), progress=False)
    assert comparable(read_metrics(resumed.run_dir)) == comparable(read_metrics(whole.run_dir))


def test_a_non_finite_loss_still_stops_a_float16_run(tmp_path, small_data, monkeypatch):
    forward, calls = training.setup.SummedTokenLoss.forward, []

    def nan_at_step_2(self, input_ids, labels):  # only training steps call it (validation has its own loss)
        calls.append(1)
        return forward(self, input_ids, labels) * (float("nan") if len(calls) == 2 else 1.0)

    monkeypatch.setattr(training.setup.SummedTokenLoss, "forward", nan_at_step_2)
    config = tiny_config(tmp_path / "nan", small_data, dtype="float16", steps=3, eval_every=100)
    with pytest.raises(TrainingDiverged, match=r"non-finite numbers at step 2 \(training loss nan"):
        train_run(config, progress=False)
    assert [m["step"] for m in read_metrics(config.run_dir)] == [0, 1]


def test_gradients_that_overflow_even_unscaled_stop_a_float16_run(tmp_path, small_data, monkeypatch):
    # --alpha 1e38: a finite loss at step 1 (LoRA's B starts at zero) but infinite gradients, which float32 stops at
    # once (test_faults). Under float16 they look like an overflow, so the steps are skipped, halving the loss scale,
    # until the scale is below 1: then no scaling explains them, and the run stops as diverged.
    monkeypatch.setattr(training.setup.Precision, "grad_scaler", scaler_starting_at(2.0))
    config = tiny_config(tmp_path / "inf", small_data, dtype="float16", steps=5, lr=1, alpha=1e38, grad_clip=0,
                         eval_every=100)
    with pytest.raises(TrainingDiverged, match=r"non-finite numbers at step 3 \(training loss [0-9.]+, gradient "
                                               r"norm (inf|nan)\)"):
        train_run(config, progress=False)
    assert [(m["step"], m["skipped_steps"]) for m in read_metrics(config.run_dir)[1:]] == [(1, 1), (2, 2)]


# ---- logits and forecasting -----------------------------------------------------------------------------------------
# fp16 autocast rounds each matmul's output to ~3.3 significant digits: neither implementation matches the float32
# logits (max errors 0.009-0.04 on these configs). Ours may be at most FP16_ERROR_RATIO times HF's error under the same
# autocast, plus one float16 step at 1.0 (2**-10) for errors near zero. Measured: ours equals HF's bit for bit (ratio
# 1.0) on every config, since both round at the same ops; 1.1 is the bf16 criterion's ratio (test_model_parity).
FP16_ERROR_RATIO, FP16_ERROR_FLOOR = 1.1, 2.0 ** -10


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_float16_autocast_logits_are_as_accurate_as_transformers(name, tmp_path):
    from qwen_mini import from_pretrained

    config = PARITY_CONFIGS[name]
    write_checkpoint(config, tmp_path, seed=sorted(PARITY_CONFIGS).index(name))
    input_ids, mask = left_padded_batch(config.vocab_size, [20, 11, 16, 5], seed=7)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # what HF's generate gives left-padded rows
    real = mask.bool()
    ours, hf = from_pretrained(tmp_path), hf_reference(tmp_path, attn_implementation="sdpa")
    with torch.no_grad():
        reference = hf(input_ids, attention_mask=mask, position_ids=position_ids).logits
        with torch.autocast("cpu", dtype=torch.float16):
            logits = {"ours": ours(input_ids, mask),
                      "hf": hf(input_ids, attention_mask=mask, position_ids=position_ids).logits}
    assert logits["ours"].dtype == torch.float16
    errors = {side: (value.float() - reference)[real].abs().max().item() for side, value in logits.items()}
    print(f"{name} float16 autocast: max logit error vs float32 ours {errors['ours']:.4f}, HF {errors['hf']:.4f}")
    assert 0 < errors["ours"] <= FP16_ERROR_RATIO * errors["hf"] + FP16_ERROR_FLOOR


def test_forecasting_in_float16_autocasts_over_float32_weights():
    from forecasting.source import from_model, parse_dtype

    assert parse_dtype("auto", CPU) is None and parse_dtype("float16", CPU) == torch.float16
    source = from_model("tiny", dtype=parse_dtype("float16", CPU))
    assert {p.dtype for p in source.model.parameters()} == {torch.float32}
    input_ids = torch.tensor([[15, 16, 13, 17, 11]])
    with torch.no_grad(), source.autocast():
        assert source.model(input_ids).dtype == torch.float16
    plain = from_model("tiny", dtype=parse_dtype("float32", CPU))
    with torch.no_grad(), plain.autocast():
        assert plain.model(input_ids).dtype == torch.float32
