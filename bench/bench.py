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
from qwen_mini.cli import positive_float, positive_int  # noqa: E402
from qwen_mini.flops import count_forward, generation_flops, meta_model, static_decode_flops  # noqa: E402
from qwen_mini.generate import DecodeStats  # noqa: E402

# Medium CPU config: the real vocabulary and layer shapes of Qwen2.5-0.5B, fewer layers, so the LM head's cost is
# the real one while a run stays within minutes on 2 cores.
BENCH_CONFIGS = {
    "medium": dict(PRESETS["qwen2.5-0.5b"], num_hidden_layers=4),
    **PRESETS,
}
TASKS = ("forward", "train_step", "generate", "generate_llmtime", "forecast")
# The Qwen2.5 tokenizer for the forecast task: the shared fixture when this checkout sits beside it, else the hub.
SHARED_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "qwen2.5-tokenizer"
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
    flops = count_forward(meta_model(config), args.batch, args.ctx, include_loss=False, training=False).forward
    return {"seconds": times, "tokens": args.batch * args.ctx, "flops": flops}


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
    if impl == "ours":
        lora.adapters_to_float32(model)  # train.py's precision: adapters and AdamW state in float32
        if args.compile:
            from training.loop import compile_blocks

            compile_blocks(model)
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params), "PEFT keeps its adapters in float32 too"
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    # bf16 weights train as train.py --dtype bfloat16 does: frozen base in bf16, matmuls under bf16 autocast.
    use_autocast = args.autocast or args.dtype == "bfloat16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_autocast else None

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
    flops = executed_step_flops(count_forward(counting_model(config, args), args.batch, args.ctx, training=True))
    return {"seconds": times, "tokens": args.batch * args.ctx, "trainable": sum(p.numel() for p in params),
            "flops": flops}


def timed_generation(fn, device, reps: int):
    """(seconds of each rep, the last rep's output) of fn(new=max_new_tokens), after a 2-token warm-up that pays the
    one-time costs (allocator, first kernels) without a whole generation."""
    with torch.inference_mode():
        fn(2)
        outputs = []
        times = timed(lambda: outputs.append(fn()), device, reps, warmup=0)
    return times, outputs[-1]


def task_generate(model, impl, config, args, device, restrict_to=None):
    """Greedy batched generation of exactly gen_new tokens per prompt. restrict_to: the only tokens allowed (the
    forecasting case): we pass them as candidate_ids, HF gets the equivalent logits processor."""
    ids = inputs(config, args.gen_prompts, args.gen_prompt_len, device, args.seed)
    mask = torch.ones_like(ids)
    mask[::3, : args.gen_prompt_len // 10] = 0  # some left padding, as real batches of prompts have
    if impl == "ours":
        from qwen_mini import generate

        def fn(new=args.gen_new):
            return generate(model, ids, mask, max_new_tokens=new, candidate_ids=restrict_to, compile=args.compile)
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
    times, tokens = timed_generation(fn, device, args.gen_reps)
    # HF computes the whole LM head every step (its logits processor masks afterwards)
    head_rows = len(restrict_to) if restrict_to is not None and impl == "ours" else None
    flops = generation_flops(meta_model(config), args.gen_prompts, args.gen_prompt_len, args.gen_prompts,
                             args.gen_new, head_rows=head_rows).total
    # the checksum lets the driver check that both implementations produced the same tokens
    return {"seconds": times, "tokens": args.gen_prompts * args.gen_new, "flops": flops,
            "decode_bytes_per_flop": decode_bytes_per_flop(config, args, args.gen_prompts, head_rows),
            "output_checksum": int((tokens.long() * torch.arange(1, tokens.shape[1] + 1, device=device)).sum())}


def task_generate_llmtime(model, impl, config, args, device):
    return task_generate(model, impl, config, args, device, restrict_to=LLMTIME_IDS)


def task_forecast(model, impl, config, args, device):
    """The forecaster's workload: `fc_samples` sampled forecasts of `fc_horizon` LLMTIME steps for each of
    `fc_trajectories` simulated trajectories, under the number grammar, stopping at the stop token. Ours: one
    prefill per prompt shared by its samples (`num_samples`) and the LM head for the grammar's tokens only. HF:
    `generate` with num_return_sequences and the very same grammar as a logits processor. The draws differ (each
    implementation samples its own way), so the check is that every row of both is a complete forecast."""
    from data.dataset import make_eval_example
    from data.llmtime import STEP_SEP
    from data.lotka_volterra import simulate
    from forecasting.grammar import NumberGrammar, max_forecast_tokens
    from qwen_mini import Tokenizer

    tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    data = simulate(n=args.fc_trajectories, steps=args.fc_context + args.fc_horizon, seed=args.seed)
    examples = [make_eval_example(trajectory, i, args.fc_context, args.fc_horizon)
                for i, trajectory in enumerate(data.trajectories)]
    ids, mask = (t.to(device) for t in tokenizer.encode_batch([ex.prompt for ex in examples]))
    n_vars, rows = data.trajectories.shape[-1], len(examples) * args.fc_samples
    max_new = max_forecast_tokens(args.fc_horizon, n_vars)

    def grammar():
        return NumberGrammar(tokenizer, config.vocab_size, rows, n_vars, args.fc_horizon, device=device)

    stop_id = grammar().stop_id

    last = {}  # the DecodeStats of the last call
    if impl == "ours":
        from qwen_mini import generate

        def fn(new=max_new):
            hook = grammar()
            last["decode"] = DecodeStats()
            return generate(model, ids, mask, max_new_tokens=new, num_samples=args.fc_samples,
                            temperature=args.fc_temperature, generator=torch.Generator(device).manual_seed(args.seed),
                            stop_token_ids=[stop_id], allowed_tokens=hook, candidate_ids=hook.candidate_ids,
                            jump_forward=args.jump_forward, compile=args.compile, stats=last["decode"])
    else:
        from transformers import LogitsProcessorList

        def fn(new=max_new):
            hook = grammar()
            torch.manual_seed(args.seed)
            # top_k=0 and top_p=1: ours applies no top-k/top-p, so neither may HF (its default top_k is 50).
            return model.generate(ids, attention_mask=mask, do_sample=True, temperature=args.fc_temperature,
                                  top_k=0, top_p=1.0, num_return_sequences=args.fc_samples, max_new_tokens=new,
                                  eos_token_id=stop_id, pad_token_id=stop_id,
                                  logits_processor=LogitsProcessorList([GrammarProcessor(hook, ids.shape[1])])
                                  )[:, ids.shape[1]:]
    times, tokens = timed_generation(fn, device, args.gen_reps)
    tokens = tokens.cpu()
    stopped = tokens == stop_id
    # tokens each row generated, its stop token included (not the padding after it)
    lengths = torch.where(stopped.any(1), stopped.int().argmax(1) + 1, tokens.shape[1])
    steps = (tokens == tokenizer.token_to_id(STEP_SEP)).sum(1)
    counter, n_candidates = meta_model(config), len(grammar().candidate_ids)
    if impl == "ours":  # one prefill per prompt; eager: decode forwards of the real tokens fed; compiled: every
        # slot of every step against the whole static cache
        decode = last["decode"]
        plain = generation_flops(counter, len(examples), ids.shape[1], rows, decode.forwards + 1,
                                 head_rows=n_candidates)
        if decode.cache_slots:
            flops = plain.prefill + static_decode_flops(counter, rows, decode.forwards,
                                                        decode.fed_slots // max(rows * decode.forwards, 1),
                                                        decode.cache_slots, head_rows=n_candidates)
        else:
            flops = plain.prefill + plain.decode * decode.fed_tokens // max(rows * decode.forwards, 1)
        extra = {"decode_forwards": decode.forwards, "fed_tokens": decode.fed_tokens, "fed_slots": decode.fed_slots,
                 "forced_tokens": decode.forced_tokens}
    else:  # num_return_sequences: every sample's row prefilled; the whole LM head every step; as many steps
        flops = generation_flops(counter, rows, ids.shape[1], rows, tokens.shape[1]).total
        extra = {"decode_forwards": tokens.shape[1] - 1}
    return {"seconds": times, "tokens": int(lengths.sum()), "rows": rows, "prompt_tokens": int(mask.sum()),
            "complete_rows": int(((steps == args.fc_horizon) & stopped.any(1)).sum()), "flops": flops,
            "decode_bytes_per_flop": decode_bytes_per_flop(config, args, rows, n_candidates if impl == "ours" else None,
                                                           cached=ids.shape[1] + max_new // 2),
            **extra}


class GrammarProcessor:
    """HF logits processor around one of our `allowed_tokens` hooks (e.g. NumberGrammar): the same constraint for
    both implementations, at the same per-step cost."""

    def __init__(self, hook, prompt_len: int):
        self.hook, self.prompt_len = hook, prompt_len

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.prompt_len:]
        return scores.masked_fill(~self.hook(generated.shape[1], generated).to(scores.device), float("-inf"))


class OnlyTokens:
    """HF logits processor: every token outside `allowed` gets -inf."""

    def __init__(self, allowed, vocab_size, device):
        self.blocked = torch.ones(vocab_size, dtype=torch.bool, device=device)
        self.blocked[allowed] = False

    def __call__(self, input_ids, scores):
        return scores.masked_fill(self.blocked, float("-inf"))


def counting_model(config: QwenConfig, args):
    """A weightless model with the train step's adapters, for counting its FLOPs."""
    import lora

    model = meta_model(config)
    lora.inject(model, rank=args.rank, alpha=args.rank, targets=tuple(args.targets.split(",")))
    return model


def executed_step_flops(report) -> int:
    """FLOPs a LoRA training step actually executes (not the 3 x forward of the budget convention): the forward;
    each matmul's input gradient where its input needs one, its weight gradient where the weight trains (the
    adapters only); attention's two products differentiate both operands; the other operations once more
    backward. Nothing before the first adapter needs a gradient: the embedding, rotary tables, the first layer's norm
    and its q/k/v base projections and adapters' inputs run forward only (k_proj too: it has no adapter)."""
    total = 0
    for row in report.rows:
        total += row.forward
        first_attention_input = row.layer == "layers.0" and row.component.startswith(
            ("input_layernorm.", "self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj."))
        if row.layer in ("embed_tokens", "rotary_emb") or row.component.startswith("self_attn.rope_k") \
                and row.layer == "layers.0":
            continue
        if row.component.endswith(".matmul"):
            trains = ".lora_A." in row.component or ".lora_B." in row.component
            input_grad = not (first_attention_input and ".lora_B." not in row.component)
            total += row.forward * (int(input_grad) + int(trains))
        elif row.component in ("self_attn.scores", "self_attn.values"):
            total += 2 * row.forward
        elif not first_attention_input or ".lora_" in row.component:
            total += row.forward
    return total


def decode_bytes_per_flop(config: QwenConfig, args, rows: int, head_rows: int | None, cached: int | None = None
                          ) -> float:
    """Bytes a decode step of `rows` rows reads per FLOP it does: every layer weight and the scored LM-head rows
    once, plus the keys/values of `cached` positions per row (default: the generate task's average)."""
    element = torch.finfo(getattr(torch, args.dtype)).bits // 8
    cached = args.gen_prompt_len + args.gen_new // 2 if cached is None else cached
    layer_weights = sum(p.numel() for name, p in meta_model(config).named_parameters() if ".layers." in name)
    head = (config.vocab_size if head_rows is None else head_rows) * config.hidden_size
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * cached * rows
    flops = count_forward(meta_model(config), rows, 1, include_loss=False, past=cached, logits="last",
                          head_rows=head_rows, training=False).forward
    return (layer_weights + head + kv) * element / flops


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
        kernels = {"F.linear": lambda: F.linear(x, w)}
        if device.type == "cpu" and torch.backends.mkldnn.is_available():
            kernels["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        for name, fn in kernels.items():
            best = min(timed(fn, device, reps=5, warmup=2))
            rates[f"{name} {n}x{k}"] = 2 * 2048 * n * k / best / 1e9
    source = torch.empty(2 ** 28 // 4, device=device)
    target = torch.empty_like(source)
    best = min(timed(lambda: target.copy_(source), device, reps=5, warmup=2))
    return {"seconds": [0.0], "tokens": 0, "gemm_gflops": rates, "gemm_peak_gflops": max(rates.values()),
            "bandwidth_gbs": 2 * source.numel() * source.element_size() / best / 1e9}


def bound_seconds(result: dict, machine: dict) -> tuple[float, str]:
    """(the fastest the task's FLOPs can run on this machine, which limit that is): FLOPs at the GEMM peak, or for
    work that reads more bytes per FLOP than the machine's balance (decode), its bytes at the bandwidth."""
    peak, bandwidth = machine["gemm_peak_gflops"] * 1e9, machine["bandwidth_gbs"] * 1e9
    per_flop = result.get("decode_bytes_per_flop")
    if per_flop is not None and per_flop * peak > bandwidth:
        return result["flops"] * per_flop / bandwidth, "bandwidth"
    return result["flops"] / peak, "GEMM"


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
    model = build_models(config, args.impl, device, dtype, args.seed) if args.task != "machine" else None
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
    result["tokens_per_s"] = result["tokens"] / result["median_s"] if result["median_s"] else 0.0
    if "flops" in result:
        result["gflops_per_s"] = result["flops"] / result["median_s"] / 1e9
    print("RESULT " + json.dumps(result))
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="medium", help="medium (default, CPU), qwen2.5-0.5b, tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
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
    p.add_argument("--tokenizer", default=str(SHARED_TOKENIZER) if SHARED_TOKENIZER.is_dir() else "Qwen/Qwen2.5-0.5B",
                   help="Qwen2.5 tokenizer (directory or hub id) for the forecast task (default: %(default)s)")
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
    args = p.parse_args(argv)
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
    import transformers, peft  # noqa: E401  (versions for the record)

    record = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "processor": platform.processor(),
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
                        f"{one['bound']} bound")
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
