"""How the benchmark measures: wall-clock repetitions (warm-up excluded), the memory in use, and the machine's limits
in the same run (the best GEMM rate of the dtype, the bandwidth of a large copy) with the bound they set on a task's
time: its FLOPs at the GEMM peak, or for decode steps that read more bytes per FLOP than the machine balances, those
bytes at the bandwidth."""
from __future__ import annotations

import os
import time

import torch

from qwen_mini import QwenConfig
from qwen_mini.flops import count_forward
from qwen_mini.model import meta_model


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def timed_generation(fn, device, reps: int):
    """(seconds of each rep, the last rep's output) of fn(new=max_new_tokens), after a 2-token warm-up that pays the
    one-time costs (allocator, first kernels) without a whole generation."""
    with torch.inference_mode():
        fn(2)
        outputs = []
        times = timed(lambda: outputs.append(fn()), device, reps, warmup=0)
    return times, outputs[-1]


def current_memory(device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def task_machine(model, impl, config, args, device):
    """The machine's limits in this run, for this dtype and thread count: the best GEMM rate at the MLP's shapes
    (F.linear, and oneDNN's linear where torch has it) and the bandwidth of a large copy."""
    import torch.nn.functional as F

    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    rates = {}
    for n, k in ((config.intermediate_size, config.hidden_size), (config.hidden_size, config.intermediate_size)):
        x = torch.randn(2048, k, generator=gen).to(device, dtype)
        w = torch.randn(n, k, generator=gen).to(device, dtype)
        kernels = {"F.linear": lambda x=x, w=w: F.linear(x, w)}
        if device.type == "cpu" and torch.backends.mkldnn.is_available():
            kernels["onednn"] = lambda x=x, w=w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        for name, fn in kernels.items():
            try:
                best = min(timed(fn, device, reps=5, warmup=2))
            except RuntimeError:  # oneDNN without a kernel for this dtype here (float16 on most CPUs)
                if name == "F.linear":
                    raise
                continue
            rates[f"{name} {n}x{k}"] = 2 * 2048 * n * k / best / 1e9
    source = torch.empty(2 ** 28 // 4, device=device)
    target = torch.empty_like(source)
    best = min(timed(lambda: target.copy_(source), device, reps=5, warmup=2))
    return {"seconds": [0.0], "tokens": 0, "gemm_gflops": rates, "gemm_peak_gflops": max(rates.values()),
            "bandwidth_gbs": 2 * source.numel() * source.element_size() / best / 1e9}


def decode_bytes_per_flop(config: QwenConfig, args, rows: int, head_rows: int | None, cached: int | None = None,
                          kv_read: int | None = None) -> float:
    """Bytes a decode step of `rows` rows reads per FLOP it does: every layer weight and the scored LM-head rows
    once, plus the keys/values of `cached` positions per row (default: the generate task's average), or of
    `kv_read` positions in all when rows share their prompt's (each query still attends to `cached` keys)."""
    element = torch.finfo(getattr(torch, args.dtype)).bits // 8
    cached = args.gen_prompt_len + args.gen_new // 2 if cached is None else cached
    layer_weights = sum(p.numel() for name, p in meta_model(config).named_parameters() if ".layers." in name)
    head = (config.vocab_size if head_rows is None else head_rows) * config.hidden_size
    kv_read = cached * rows if kv_read is None else kv_read
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * kv_read
    flops = count_forward(meta_model(config), rows, 1, include_loss=False, past=cached, logits="last",
                          head_rows=head_rows, training=False).forward
    return (layer_weights + head + kv) * element / flops


def bound_seconds(result: dict, machine: dict) -> tuple[float, str]:
    """(the fastest the task's FLOPs can run on this machine, which limit that is): FLOPs at the GEMM peak, or for
    work that reads more bytes per FLOP than the machine's balance (decode), its bytes at the bandwidth."""
    peak, bandwidth = machine["gemm_peak_gflops"] * 1e9, machine["bandwidth_gbs"] * 1e9
    per_flop = result.get("decode_bytes_per_flop")
    if per_flop is not None and per_flop * peak > bandwidth:
        return result["flops"] * per_flop / bandwidth, "bandwidth"
    return result["flops"] / peak, "GEMM"
