"""Speed and memory of qwen_mini against HF transformers (+ PEFT), same config, weights, inputs, dtype and threads.

    python bench/bench.py                       # CPU defaults: medium config with the real 151,936-token vocab
    python bench/bench.py --config qwen2.5-0.5b --device cuda --dtype bfloat16 --gen-prompts 100 \
        --gen-prompt-len 500 --gen-new 500      # the GPU setting

Each (task, implementation) runs in a fresh subprocess so its peak memory is its own (peak RSS on CPU,
torch.cuda.max_memory_allocated on GPU). Timings: warm-up excluded, median of --reps repetitions.

Every task also reports the FLOPs each implementation executed (counted by qwen_mini.flops from what it ran: HF's
full LM head and its prefill of every sample included), its achieved GFLOP/s, and the bound of the machine measured
in the same run (first subprocess): the best GEMM rate of the dtype (F.linear or oneDNN, MLP shapes, 2048 rows) and
the memory bandwidth (a large copy). A task's bound is its FLOPs at the GEMM peak, or for decode steps that read
more bytes (weights, cache) per FLOP than the machine balances, those bytes at the bandwidth.
Writes a JSON with every number and prints the ours/theirs ratios. This file is the command line and the driver;
the tasks are `bench/tasks.py`, timing and the machine's limits `bench/measure.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from bench.measure import bound_seconds, current_memory, task_machine
from bench.tasks import OURS_ONLY, TASK_RUNNERS, TASKS, build_models
from common.args import positive_float, positive_int
from common.devices import DTYPES, dtype_from_flag
from qwen_mini import PRESETS, QwenConfig

# Medium CPU config: the real vocabulary and layer shapes of Qwen2.5-0.5B, fewer layers, so the LM head's cost is
# the real one while a run stays within minutes on 2 cores.
BENCH_CONFIGS = {
    "medium": dict(PRESETS["qwen2.5-0.5b"], num_hidden_layers=4),
    # bench/gpu_check.py --cpu-smoke: one layer, so that torch.compile's tracing takes seconds, not tens of them
    "tiny-1layer": dict(PRESETS["tiny"], num_hidden_layers=1),
    **PRESETS,
}
# The Qwen2.5 tokenizer for the forecast task: the shared fixture when this checkout sits beside it, else the hub.
SHARED_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "qwen2.5-tokenizer"


def build_config(name: str) -> QwenConfig:
    if name not in BENCH_CONFIGS:
        raise SystemExit(f"unknown --config {name!r}; choose from {', '.join(BENCH_CONFIGS)}")
    return QwenConfig(**BENCH_CONFIGS[name], name=name)


def run_case(args) -> dict:
    """One (task, impl) in this process; prints one JSON line."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    config = build_config(args.config)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build_models(config, args.impl, device, dtype, args.seed) if args.task != "machine" else None
    before = current_memory(device)
    runner = task_machine if args.task == "machine" else TASK_RUNNERS[args.task]
    result = runner(model, args.impl, config, args, device)
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
        result["peak_kind"] = "cuda max_memory_allocated"
    else:
        result["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result["peak_kind"] = "peak RSS"
    # What the task itself needed on top of the loaded model and libraries (activations, cache, optimizer state):
    # the fair comparison, since the HF process also carries the transformers library itself.
    result["task_peak_bytes"] = result["peak_bytes"] - before
    result["median_s"] = statistics.median(result["seconds"])
    result["tokens_per_s"] = result["tokens"] / result["median_s"] if result["median_s"] else 0.0
    if "flops" in result:
        result["gflops_per_s"] = result["flops"] / result["median_s"] / 1e9
    print("RESULT " + json.dumps(result))
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="medium", help="medium (default, CPU), qwen2.5-0.5b, tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="the weights' dtype (default: %(default)s); the train step trains as train.py does: "
                        "bfloat16 = bf16 base under bf16 autocast, float16 = float32 weights under fp16 autocast with "
                        "loss scaling; auto = bfloat16 on CUDA GPUs that have it, float16 on older ones, else float32")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, same for both (default: all)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--impls", default="ours,hf",
                   help="which implementations to run (default: both; 'ours' alone for a lever's variant)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up (median reported)")
    p.add_argument("--gen-prompts", type=int, default=100)
    p.add_argument("--gen-prompt-len", type=int, default=500)
    p.add_argument("--gen-new", type=int, default=500)
    p.add_argument("--gen-reps", type=int, default=1)
    p.add_argument("--fc-trajectories", type=positive_int, default=10, help="forecast task: simulated trajectories")
    p.add_argument("--fc-samples", type=positive_int, default=10, help="forecast task: samples per trajectory")
    p.add_argument("--fc-context", type=positive_int, default=50, help="forecast task: context steps (~10 tokens each)")
    p.add_argument("--fc-horizon", type=positive_int, default=50, help="forecast task: forecast steps")
    p.add_argument("--fc-temperature", type=positive_float, default=0.8,
                   help="forecast task: sampling temperature (default: %(default)s)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer (directory or hub id) for the forecast task (default: models/lv-tiny's character "
                        "tokenizer for --config lv-tiny, else Qwen2.5's: the shared fixture when present, else the "
                        "hub)")
    p.add_argument("--hf-cache", default="dynamic", choices=["dynamic", "static"],
                   help="HF generate's cache implementation")
    p.add_argument("--autocast", action="store_true",
                   help="train step: float32 weights under bf16 autocast (--dtype bfloat16 trains as train.py does: "
                        "bf16 base, float32 adapters, bf16 autocast)")
    p.add_argument("--compile", action="store_true",
                   help="ours: torch.compile the decoder blocks (train step) and the decode step (generation)")
    p.add_argument("--jump-forward", action="store_true", help="ours, forecast task: jump-forward decoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    p.add_argument("--impl", choices=["ours", "hf"], help=argparse.SUPPRESS)  # internal: run one case
    p.add_argument("--task", choices=(*TASKS, "machine"), help=argparse.SUPPRESS)
    return p


def parse_args(argv=None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """bench.py's flags with their defaults resolved (the tokenizer, --dtype auto); bench/gpu_check.py builds its
    cases' settings here too."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.tokenizer is None:  # the model's own vocabulary: lv-tiny's 32 characters, or Qwen2.5's
        args.tokenizer = str(ROOT / "models" / "lv-tiny") if args.config == "lv-tiny" else \
            str(SHARED_TOKENIZER) if SHARED_TOKENIZER.is_dir() else "Qwen/Qwen2.5-0.5B"
    try:  # every process resolves auto alike (the subprocesses get the same flags)
        args.dtype = dtype_from_flag(args.dtype, torch.device(args.device))
    except (ValueError, RuntimeError) as e:
        p.error(str(e))
    return args, p


def main(argv=None):
    args, p = parse_args(argv)
    if args.impl:
        run_case(args)
        return

    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if not impls or set(impls) - {"ours", "hf"}:
        p.error(f"--impls takes ours, hf or both, got {args.impls!r}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        p.error(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    passthrough = without_out_flag(list(argv if argv is not None else sys.argv[1:]))
    results = {}
    print("[bench] machine limits ...", flush=True)
    machine = run_subprocess(passthrough, "machine", "ours")
    print(f"[bench] GEMM peak {machine['gemm_peak_gflops']:.0f} GFLOP/s ({args.dtype}), memory bandwidth "
          f"{machine['bandwidth_gbs']:.1f} GB/s", flush=True)
    for task in tasks:
        for impl in impls:
            if impl == "hf" and task in OURS_ONLY:
                continue
            print(f"[bench] {task} / {impl} ...", flush=True)
            results[f"{task}/{impl}"] = result = run_subprocess(passthrough, task, impl)
            result["bound_s"], result["bound"] = bound_seconds(result, machine)
            result["fraction_of_bound"] = result["bound_s"] / result["median_s"]
        ours, theirs = results.get(f"{task}/ours"), results.get(f"{task}/hf")
        if ours and theirs and "output_checksum" in ours and ours["output_checksum"] != theirs["output_checksum"]:
            print(f"[bench] WARNING: {task}: our tokens differ from HF's (checksums {ours['output_checksum']} vs "
                  f"{theirs['output_checksum']})")
        for impl, result in (("ours", ours), ("hf", theirs)):
            if result and "complete_rows" in result and result["complete_rows"] != result["rows"]:
                print(f"[bench] WARNING: {task}/{impl}: only {result['complete_rows']} of {result['rows']} rows are "
                      f"complete forecasts")
    import peft
    import transformers

    record = {"date": time.strftime("%Y-%m-%d"), "platform": platform.platform(), "processor": platform.processor(),
              "cpu_count": os.cpu_count(), "device": args.device,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
              "args": {k: v for k, v in vars(args).items() if k not in ("impl", "task")}, "machine": machine,
              "results": results}
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(format_table(record))
    print(f"\nwrote {args.out}")


def run_subprocess(passthrough: list[str], task: str, impl: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *passthrough, "--impl", impl, "--task", task],
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{task}/{impl} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def without_out_flag(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            kept.append(arg)
    return kept


def format_table(record) -> str:
    machine = record["machine"]
    rows = [f"{record['args']['dtype']}, {record['args']['config']}: GEMM peak {machine['gemm_peak_gflops']:.0f} "
            f"GFLOP/s, bandwidth {machine['bandwidth_gbs']:.1f} GB/s (measured in this run)",
            f"{'task':<16} {'ours s':>9} {'HF s':>9} {'time ours/HF':>12} {'ours tok/s':>11} {'HF tok/s':>10} "
            f"{'task GiB ours/HF':>17} {'GFLOP ours/HF':>17} {'GFLOP/s ours/HF':>16} {'ours % of bound':>16}"]
    results = record["results"]
    for task in TASKS:
        if f"{task}/ours" not in results and f"{task}/hf" not in results:
            continue
        a, b = results.get(f"{task}/ours"), results.get(f"{task}/hf")
        if a is None or b is None:
            one = a or b
            rows.append(f"{task:<16} {'ours' if a else 'HF'} only: {one['median_s']:.3f} s, {one['tokens_per_s']:.1f} "
                        f"tok/s, task {one['task_peak_bytes'] / 2**30:.2f} GiB, {one['flops'] / 1e9:.0f} GFLOP, "
                        f"{one['gflops_per_s']:.0f} GFLOP/s, {100 * one['fraction_of_bound']:.0f} % of the "
                        f"{one['bound']} bound" + (f"; {one['speedup']:.2f}x faster than a copy of the prompt per "
                                                   "sample" if "speedup" in one else ""))
            continue
        rows.append(f"{task:<16} {a['median_s']:>9.3f} {b['median_s']:>9.3f} {a['median_s'] / b['median_s']:>12.2f} "
                    f"{a['tokens_per_s']:>11.1f} {b['tokens_per_s']:>10.1f} "
                    f"{a['task_peak_bytes'] / 2**30:>5.2f}/{b['task_peak_bytes'] / 2**30:<5.2f}"
                    f"{a['task_peak_bytes'] / max(b['task_peak_bytes'], 1):>5.2f}x "
                    f"{a['flops'] / 1e9:>8.0f}/{b['flops'] / 1e9:<8.0f} "
                    f"{a['gflops_per_s']:>7.0f}/{b['gflops_per_s']:<8.0f} "
                    f"{100 * a['fraction_of_bound']:>6.0f} % {a['bound']}")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
