"""Speed and memory of qwen_mini against HF transformers (+ PEFT), same config, weights, inputs, dtype and threads.

    python bench/bench.py                       # CPU defaults: medium config with the real 151,936-token vocab
    python bench/bench.py --config qwen2.5-0.5b --device cuda --dtype bfloat16 --gen-prompts 100 \
        --gen-prompt-len 500 --gen-new 500      # the GPU setting

Each (task, implementation) runs in a fresh subprocess so its peak memory is its own (peak RSS on CPU,
torch.cuda.max_memory_allocated on GPU). Timings: warm-up excluded, median of --reps repetitions.
Writes a JSON with every number and prints the ours/theirs ratios.
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

import torch  # noqa: E402

from bench.hf_twin import hf_twin  # noqa: E402
from qwen_mini import PRESETS, Qwen, QwenConfig  # noqa: E402

# Medium CPU config: the real vocabulary and layer shapes of Qwen2.5-0.5B, fewer layers, so the LM head's cost is
# the real one while a run stays within minutes on 2 cores.
BENCH_CONFIGS = {
    "medium": dict(PRESETS["qwen2.5-0.5b"], num_hidden_layers=4),
    **PRESETS,
}
TASKS = ("forward", "train_step", "generate", "generate_llmtime")
# Qwen ids of the characters LLMTIME text is made of: digits 0-9 (15-24), '.' 13, ',' 11, ';' 26.
LLMTIME_IDS = [11, 13, *range(15, 25), 26]


def build_config(name: str) -> QwenConfig:
    if name not in BENCH_CONFIGS:
        raise SystemExit(f"unknown --config {name!r}; choose from {', '.join(BENCH_CONFIGS)}")
    return QwenConfig(**BENCH_CONFIGS[name], name=name)


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


def build_models(config: QwenConfig, impl: str, device, dtype, seed: int):
    """Our model with seeded random weights; for impl="hf", HF's Qwen2ForCausalLM holding the very same tensors."""
    torch.manual_seed(seed)
    ours = Qwen(config).to(device=device, dtype=dtype).eval()
    if impl == "ours":
        return ours
    return hf_twin(ours)


def inputs(config, batch, length, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(config.vocab_size, 151643), (batch, length), generator=gen).to(device)


def task_forward(model, impl, config, args, device):
    ids = inputs(config, args.batch, args.ctx, device, args.seed)
    if impl == "ours":
        fn = lambda: model(ids)  # noqa: E731
    else:
        fn = lambda: model(ids).logits  # noqa: E731
    with torch.inference_mode():
        times = timed(fn, device, args.reps)
    return {"seconds": times, "tokens": args.batch * args.ctx}


def task_train_step(model, impl, config, args, device):
    ids = inputs(config, args.batch, args.ctx, device, args.seed)
    targets = tuple(args.targets.split(","))
    if impl == "ours":
        import lora
        from qwen_mini.loss import causal_lm_loss

        lora.inject(model, rank=args.rank, alpha=args.rank, targets=targets)
        loss_fn = lambda: causal_lm_loss(model, ids, ids)  # noqa: E731
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=list(targets),
                                                 lora_dropout=0.0))
        loss_fn = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and args.autocast else None

    def step():
        optimizer.zero_grad(set_to_none=True)
        if autocast is not None:
            with autocast:
                loss = loss_fn()
        else:
            loss = loss_fn()
        loss.backward()
        optimizer.step()

    times = timed(step, device, args.reps)
    return {"seconds": times, "tokens": args.batch * args.ctx, "trainable": sum(p.numel() for p in params)}


def task_generate(model, impl, config, args, device, restrict_to=None):
    """Greedy batched generation of exactly gen_new tokens per prompt. restrict_to: the only tokens allowed (the
    forecasting case): we pass them as candidate_ids, HF gets the equivalent logits processor."""
    ids = inputs(config, args.gen_prompts, args.gen_prompt_len, device, args.seed)
    mask = torch.ones_like(ids)
    mask[::3, : args.gen_prompt_len // 10] = 0  # some left padding, as real batches of prompts have
    if impl == "ours":
        from qwen_mini import generate

        def fn(new=args.gen_new):
            return generate(model, ids, mask, max_new_tokens=new, candidate_ids=restrict_to)
    else:
        def fn(new=args.gen_new):
            return model.generate(ids, attention_mask=mask, **{**kwargs, "max_new_tokens": new,
                                                                "min_new_tokens": new})[:, ids.shape[1]:]

        kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        if args.hf_cache != "dynamic":
            kwargs["cache_implementation"] = args.hf_cache
        if restrict_to is not None:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([OnlyTokens(restrict_to, config.vocab_size, device)])
    with torch.inference_mode():
        fn(2)  # warm-up: one-time costs (allocator, first kernels) without a whole generation
        outputs = []
        times = timed(lambda: outputs.append(fn()), device, args.gen_reps, warmup=0)
        tokens = outputs[-1]
    # the checksum lets the driver check that both implementations produced the same tokens
    return {"seconds": times, "tokens": args.gen_prompts * args.gen_new,
            "output_checksum": int((tokens.long() * torch.arange(1, tokens.shape[1] + 1, device=device)).sum())}


def task_generate_llmtime(model, impl, config, args, device):
    return task_generate(model, impl, config, args, device, restrict_to=LLMTIME_IDS)


class OnlyTokens:
    """HF logits processor: every token outside `allowed` gets -inf."""

    def __init__(self, allowed, vocab_size, device):
        self.blocked = torch.ones(vocab_size, dtype=torch.bool, device=device)
        self.blocked[allowed] = False

    def __call__(self, input_ids, scores):
        return scores.masked_fill(self.blocked, float("-inf"))


def current_memory(device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(args) -> dict:
    """One (task, impl) in this process; prints one JSON line."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    config = build_config(args.config)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build_models(config, args.impl, device, dtype, args.seed)
    before = current_memory(device)
    result = globals()[f"task_{args.task}"](model, args.impl, config, args, device)
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
    result["tokens_per_s"] = result["tokens"] / result["median_s"]
    print("RESULT " + json.dumps(result))
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="medium", help="medium (default, CPU), qwen2.5-0.5b, tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, same for both (default: all)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up (median reported)")
    p.add_argument("--gen-prompts", type=int, default=100)
    p.add_argument("--gen-prompt-len", type=int, default=500)
    p.add_argument("--gen-new", type=int, default=500)
    p.add_argument("--gen-reps", type=int, default=1)
    p.add_argument("--hf-cache", default="dynamic", choices=["dynamic", "static"],
                   help="HF generate's cache implementation")
    p.add_argument("--autocast", action="store_true", help="bf16 autocast for the training step on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    p.add_argument("--impl", choices=["ours", "hf"], help=argparse.SUPPRESS)  # internal: run one case
    p.add_argument("--task", choices=TASKS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.impl:
        run_case(args)
        return

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        p.error(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    passthrough = without_out_flag(list(argv if argv is not None else sys.argv[1:]))
    results = {}
    for task in tasks:
        for impl in ("ours", "hf"):
            print(f"[bench] {task} / {impl} ...", flush=True)
            proc = subprocess.run([sys.executable, __file__, *passthrough, "--impl", impl, "--task", task],
                                  capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"{task}/{impl} failed:\n{proc.stderr[-3000:]}")
            results[f"{task}/{impl}"] = json.loads(lines[-1][len("RESULT "):])
        ours, theirs = results[f"{task}/ours"], results[f"{task}/hf"]
        if "output_checksum" in ours and ours["output_checksum"] != theirs["output_checksum"]:
            print(f"[bench] WARNING: {task}: our tokens differ from HF's (checksums {ours['output_checksum']} vs "
                  f"{theirs['output_checksum']})")
    import transformers, peft  # noqa: E401  (versions for the record)

    record = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "processor": platform.processor(),
              "cpu_count": os.cpu_count(), "device": args.device,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
              "args": {k: v for k, v in vars(args).items() if k not in ("impl", "task")}, "results": results}
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(format_table(record))
    print(f"\nwrote {args.out}")


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
    rows = [f"{'task':<16} {'ours s':>9} {'HF s':>9} {'time ours/HF':>12} {'ours tok/s':>11} {'HF tok/s':>10} "
            f"{'ours GiB':>9} {'HF GiB':>8} {'task GiB ours/HF':>17}"]
    results = record["results"]
    for task in TASKS:
        if f"{task}/ours" not in results:
            continue
        a, b = results[f"{task}/ours"], results[f"{task}/hf"]
        rows.append(f"{task:<16} {a['median_s']:>9.3f} {b['median_s']:>9.3f} {a['median_s'] / b['median_s']:>12.2f} "
                    f"{a['tokens_per_s']:>11.1f} {b['tokens_per_s']:>10.1f} {a['peak_bytes'] / 2**30:>9.2f} "
                    f"{b['peak_bytes'] / 2**30:>8.2f} "
                    f"{a['task_peak_bytes'] / 2**30:>7.2f}/{b['task_peak_bytes'] / 2**30:<5.2f}"
                    f"{a['task_peak_bytes'] / max(b['task_peak_bytes'], 1):>5.2f}")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
