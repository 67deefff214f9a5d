"""The benchmark's tasks, each run alike by ours and by HF transformers (+ PEFT) on the same weights and inputs:
a forward pass, a LoRA training step, greedy generation (free, or restricted to LLMTIME's tokens) and the forecaster's
sampled workload under the number grammar. Each returns its timings, the tokens it produced and the FLOPs it
executed (counted by qwen_mini.flops from what it ran)."""
from __future__ import annotations

import statistics
import time

import torch

from bench.hf_twin import hf_twin
from bench.measure import decode_bytes_per_flop, synchronize, timed, timed_generation
from qwen_mini import Qwen, QwenConfig
from qwen_mini.flops import count_forward, generation_flops, static_decode_flops
from qwen_mini.generate import DecodeStats
from qwen_mini.model import meta_model

# Qwen ids of the characters LLMTIME text is made of: digits 0-9 (15-24), '.' 13, ',' 11, ';' 26.
LLMTIME_IDS = [11, 13, *range(15, 25), 26]


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
        fn = lambda: model(ids)
    else:
        fn = lambda: model(ids).logits
    with torch.inference_mode():
        times = timed(fn, device, args.reps)
    flops = count_forward(meta_model(config), args.batch, args.ctx, include_loss=False, training=False).forward
    return {"seconds": times, "tokens": args.batch * args.ctx, "flops": flops}


def task_train_step(model, impl, config, args, device):
    import lora  # ours trains with it; both count their FLOPs on its weightless adapted model

    ids = inputs(config, args.batch, args.ctx, device, args.seed)
    targets = tuple(args.targets.split(","))
    if args.dtype == "float16":
        model.float()  # train.py's float16: float32 weights under fp16 autocast, with loss scaling
    if impl == "ours":
        from qwen_mini.loss import causal_lm_loss

        lora.inject(model, rank=args.rank, alpha=args.rank, targets=targets)
        loss_fn = lambda: causal_lm_loss(model, ids, ids)
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=list(targets),
                                                 lora_dropout=0.0))
        loss_fn = lambda: model(input_ids=ids, labels=ids).loss
    model.train()
    if impl == "ours":
        lora.adapters_to_float32(model)  # train.py's precision: adapters and AdamW state in float32
        if args.compile:
            from training.setup import compile_blocks

            compile_blocks(model)
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params), "PEFT keeps its adapters in float32 too"
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    # bf16 weights train as train.py --dtype bfloat16 does: frozen base in bf16, matmuls under bf16 autocast;
    # float16 as train.py --dtype float16 does: float32 weights, fp16 autocast, dynamic loss scaling (GradScaler).
    amp = torch.float16 if args.dtype == "float16" else torch.bfloat16
    use_autocast = args.autocast or args.dtype in ("bfloat16", "float16")
    autocast = torch.autocast(device.type, dtype=amp) if use_autocast else None
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "float16")

    def step():
        optimizer.zero_grad(set_to_none=True)
        if autocast is not None:
            with autocast:
                loss = loss_fn()
        else:
            loss = loss_fn()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    times = timed(step, device, args.reps)
    counter = lora.lora_model_on_meta(config, args.rank, args.rank, targets)  # the step's adapters, no weights
    flops = executed_step_flops(count_forward(counter, args.batch, args.ctx, training=True))
    return {"seconds": times, "tokens": args.batch * args.ctx, "trainable": sum(p.numel() for p in params),
            "flops": flops}


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


def task_decode_shared(model, impl, config, args, device):
    """The decode phase (prefill excluded) of `fc_samples` sampled continuations of `gen_new` tokens for each of
    `gen_prompts` prompts of `gen_prompt_len` tokens: the samples sharing their prompt's keys/values
    (`KVCache.share`, what generate does), alternated in this one process with a copy of the prompt per sample
    (`KVCache.repeat_interleave`, generate before issue 25): the same rows, draws and tokens (checked). Ours only:
    HF has no shared-prefix cache to switch. `seconds` are the shared runs', `copies_seconds` the copies'."""
    from qwen_mini.generate import DecodeState, Sampling, decode_n_tokens, prefill

    if impl != "ours":
        raise SystemExit("decode_shared compares two of our caches: run it with --impls ours")
    prompts, samples, new = args.gen_prompts, args.fc_samples, args.gen_new
    ids = inputs(config, prompts, args.gen_prompt_len, device, args.seed)
    mask, head, rows = torch.ones_like(ids), model.lm_head.weight, prompts * samples
    cache_len = args.gen_prompt_len + new

    def decode_phase(shared: bool, new_tokens: int = new):
        if shared:
            cache, logits = prefill(model, ids, mask, head, samples, cache_len, compile=False)
        else:
            prompt_cache = model.new_cache(prompts, args.gen_prompt_len)
            logits = (model.hidden_states(ids, mask, kv_cache=prompt_cache)[:, -1] @ head.T).float()
            cache, logits = prompt_cache.repeat_interleave(samples, max_len=cache_len), logits.repeat_interleave(
                samples, dim=0)
        out = torch.zeros(rows, new_tokens, dtype=torch.long, device=device)
        uniforms = torch.rand(rows, new_tokens, generator=torch.Generator().manual_seed(args.seed)).to(device)
        state = DecodeState(cache, head, out, torch.zeros(0, dtype=torch.long, device=device), 0, None, None,
                            uniforms, DecodeStats(), Sampling(args.fc_temperature), False, False)
        synchronize(device)
        start = time.perf_counter()
        decode_n_tokens(model, state, logits)
        synchronize(device)
        return time.perf_counter() - start, out

    times = {True: [], False: []}
    with torch.inference_mode():
        decode_phase(True, 2), decode_phase(False, 2)  # warm-up
        for _ in range(args.reps):
            written = {}
            for shared in (True, False):  # alternated, so both see the same machine load
                seconds, written[shared] = decode_phase(shared)
                times[shared].append(seconds)
            if not torch.equal(written[True], written[False]):
                raise AssertionError("the shared cache wrote other tokens than the copies")
    counter = meta_model(config)
    flops = generation_flops(counter, prompts, args.gen_prompt_len, rows, new).decode
    kv_read = prompts * args.gen_prompt_len + rows * new // 2  # positions of keys/values a step reads, on average
    return {"seconds": times[True], "copies_seconds": times[False], "tokens": rows * (new - 1), "rows": rows,
            "speedup": statistics.median(times[False]) / statistics.median(times[True]), "flops": flops,
            "decode_bytes_per_flop": decode_bytes_per_flop(config, args, rows, None, kv_read=kv_read),
            "copies_decode_bytes_per_flop": decode_bytes_per_flop(config, args, rows, None)}


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


# task name -> its function (model, impl, config, args, device) -> result dict; the order of the printed table
TASK_RUNNERS = {"forward": task_forward, "train_step": task_train_step, "generate": task_generate,
                "generate_llmtime": task_generate_llmtime, "forecast": task_forecast,
                "decode_shared": task_decode_shared}
OURS_ONLY = ("decode_shared",)  # tasks that compare two of our variants: never run for HF
TASKS = tuple(TASK_RUNNERS)
