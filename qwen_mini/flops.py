"""FLOPs of a training step, counted from the modules that run.

Every module type has a counting function (`register_counter`) that reads its own shapes — weight matrices,
head counts, norm widths — and reports the floating-point operations of one forward pass over `batch` sequences of
`seq` tokens. `count_forward` walks the model's actual module tree (`model.model.layers[i].self_attn.q_proj`, ...)
from the top, so a changed model gives a changed count, and it refuses to finish if some module was not counted; the
count comes back as a `qwen_mini.flop_report.FlopReport`. Nothing here allocates: it works on a model built under
`torch.device("meta")` (`qwen_mini.model.meta_model`).

Conventions (the users' spreadsheet rules, now in one place):

* Primitive costs: `COSTS` (override any entry with `costs={"exp": 1}`).
* A matrix product (m x n) . (n x p) costs m*p*(n multiplications + (n-1) additions) = m*p*(2n-1); a bias add m*p
  more. (`torch.utils.flop_counter` counts 2*m*n*p, i.e. m*p more per product; with a bias the two agree.)
* Backward = 2 x forward for every row (`flop_report.BACKWARD_FACTOR`), a training step = forward + backward. This
  holds by convention for LoRA too, although a frozen base weight needs no weight gradient.
* Embedding lookup: free. RMSNorm per row of width d: d squares, mean (d-1 additions + 1 division), + eps, sqrt,
  inverse, d scales, d weight multiplies = 4d + 12 with the default costs.
* Rotary embedding: the cos/sin tables ARE counted, once per forward (the model computes them every forward: angle
  products for head_dim/2 frequencies, then cos and sin of head_dim angles). Applying them to every query and key head
  vector of width d: x*cos (d), negate half for rotate_half (d/2), *sin (d), add (d).
* Attention, per batch element and query head, over the full T x T score matrix (causal or not: the kernels and
  torch's counter compute the square, the mask is a select and costs nothing): scores Q.K^T, one scaling multiply per
  score, softmax per row = T exponentials + (T-1) additions + T divisions (the max subtraction that keeps exp finite
  is a numerical detail and is not counted), then P.V.
* Grouped-query attention: gqa="real" (default) counts the k/v projections (and the rotary on k) at the model's
  num_key_value_heads; gqa="mha" is the users' simplification that counts them as if every query head had its own
  k/v head. The score and value products run per query head either way.
* SwiGLU: SiLU(x) = x / (1 + exp(-x)) = negation + exponential + addition + division per element; gate * up one
  multiply per element. Residual adds: one addition per element, twice per block.
* LM head and loss follow `qwen_mini.loss.causal_lm_loss`, what the trainer runs: the last position of a window has
  no next token, so the LM head and the loss cover batch*(seq-1) positions. Cross-entropy per position over the
  vocabulary V: V exponentials, V-1 additions, 1 logarithm, 1 subtraction (log-sum-exp minus the target logit); the
  mean over N positions: N-1 additions + 1 division. With include_loss=False the count is a plain forward that
  returns logits for all batch*seq positions.
* LoRA (`base_layer(x) + scaling * lora_B(lora_A(dropout(x)))`, recognised by its attributes, not its class): the
  base linear, the A and B products, one multiply by `scaling` and one addition per output element; dropout with
  p > 0 costs 2 per input element (mask / (1-p), then the multiply), an identity nothing. In evaluation and
  generation (`training=False`) dropout is off and costs nothing.
* Evaluation (`eval_flops`): the forward of a training step with its loss, no backward, no dropout.
* Generation with a KV cache (`generation_flops`), as `qwen_mini.generate` runs it: the prefill is one forward over
  every (left-padded) prompt position, counted once per prompt however many samples share it, with the LM head on
  the last position only; then every token fed back is one decode forward whose query attends to all cached keys
  (`past` of them plus itself) — the rectangle T x (past + T) in place of the square. A row generates n tokens and
  feeds n-1 of them back (the last one is not fed); finished rows keep decoding until the whole batch stops, so
  every row counts the batch's steps. Feeding k tokens in one call counts as feeding them one by one. The LM head
  covers only the rows of the weight that are scored (`head_rows`: the grammar's candidate tokens when generation
  is restricted to them). Sampling, the grammar's masks and argmax are not model arithmetic and are not counted.
  Samples of one prompt share its keys/values (`KVCache.share`: stored once, read once per step for all of them),
  which saves memory traffic, not arithmetic: every row's queries still score the prompt's keys and its own, so the
  attention is counted per row over prompt + own keys, as without sharing. Its two partial softmaxes are merged by
  their log-sum-exp, a rescaling that, like the max subtraction, is a numerical detail and is not counted.
  Compiled decoding over a static cache (`static_decode_flops`) computes more: every step's fixed number of slots
  per row, padding and finished rows included, each attending to every slot of the cache.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from torch import nn

from .flop_report import FlopCountError, FlopReport, FlopRow
from .model import MLP, Attention, Block, Qwen, RMSNorm, RotaryEmbedding

__all__ = ["COSTS", "GQA_MODES", "CountContext", "GenerationCounter", "GenerationFlops", "count_forward",
           "counter_for", "cross_entropy_flops", "eval_flops", "generation_counter", "generation_flops",
           "is_lora_linear", "linear_features", "matmul_flops",
           "register_counter", "resolve_costs", "static_decode_flops", "training_step_flops", "unregister_counter"]

# FLOPs per primitive operation (the users' table). Read-only: pass `costs=` to override entries.
COSTS: Mapping[str, int] = MappingProxyType({
    "add": 1, "sub": 1, "neg": 1,          # addition, subtraction, negation
    "mul": 1, "div": 1, "inv": 1,          # multiplication, division, inverse (1/x)
    "relu": 1, "abs": 1,                   # ReLU, absolute value
    "exp": 10, "log": 10,                  # exponential, logarithm
    "sin": 10, "cos": 10, "sqrt": 10,      # sine, cosine, square root
})
GQA_MODES = ("real", "mha")


def resolve_costs(costs: Mapping[str, int] | None = None) -> dict[str, int]:
    """`COSTS` with the given entries replaced; unknown primitives and non-integer costs are errors."""
    resolved = dict(COSTS)
    for name, value in (costs or {}).items():
        if name not in COSTS:
            raise FlopCountError(f"unknown primitive {name!r} in costs; known primitives: {', '.join(COSTS)}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise FlopCountError(f"cost of {name!r} must be a non-negative integer (counts are exact), got {value!r}")
        resolved[name] = value
    return resolved


def matmul_flops(m: int, n: int, p: int, costs: Mapping[str, int] = COSTS) -> int:
    """(m x n) . (n x p): n multiplications and n-1 additions for each of the m*p outputs = m*p*(2n-1)."""
    return m * p * (n * costs["mul"] + (n - 1) * costs["add"])


def cross_entropy_flops(positions: int, vocab: int, costs: Mapping[str, int] = COSTS) -> dict[str, int]:
    """Mean cross-entropy of `positions` rows of `vocab` logits, by operation (see the module docstring)."""
    return {
        "exp": positions * vocab * costs["exp"],
        "sum": positions * (vocab - 1) * costs["add"],
        "log": positions * costs["log"],
        "minus_target": positions * costs["sub"],
        "mean": (positions - 1) * costs["add"] + costs["div"],
    }


# ---- the counting context and the registry -------------------------------------------------------------------------

CounterFn = Callable[[nn.Module, "CountContext"], Iterable[tuple]]

_COUNTERS: dict[type, CounterFn] = {}


@dataclass
class _Walk:
    """State shared by every context of one count: module paths and which modules have been counted."""
    paths: dict[int, str]
    counted: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class CountContext:
    """What a counter needs besides its module: the batch shape, the GQA mode, the cost table.

    `past`: keys already in a KV cache before these `seq` new tokens (each query attends to past + seq keys);
    `logits`: "all" positions through the LM head, or the "last" one of each sequence (generation); `head_rows`: rows
    of the LM head weight that are scored (None: the whole vocabulary); `training`: dropout is active.
    A parent may pass shape hints to a child it counts: `tokens` (rows the child sees, default batch*seq),
    `in_features`/`out_features` (widths that differ from the child's own weights, as for the GQA simplification)."""
    batch: int
    seq: int
    gqa: str
    costs: Mapping[str, int]
    include_loss: bool
    walk: _Walk
    tokens: int
    in_features: int | None = None
    out_features: int | None = None
    past: int = 0
    logits: str = "all"
    head_rows: int | None = None
    training: bool = True

    def count(self, module: nn.Module, name: str, *, tokens: int | None = None, in_features: int | None = None,
              out_features: int | None = None) -> list[tuple]:
        """Count a child module; its costs come back named `name.<component>`."""
        child = dataclasses.replace(self, tokens=self.tokens if tokens is None else tokens, in_features=in_features,
                                    out_features=out_features)
        self.mark_counted(module)
        return [((name, *path), flops, where) for path, flops, where in _run_counter(module, child)]

    def mark_counted(self, module: nn.Module) -> None:
        """Declare `module` accounted for (containers, or children a counter prices itself)."""
        self.walk.counted.add(id(module))


def _run_counter(module: nn.Module, ctx: CountContext) -> list[tuple[tuple[str, ...], int, str]]:
    """The module's costs as (path, forward FLOPs, reporting module's path); a counter's own (name, FLOPs) pairs
    are attributed to `module`, its children's costs keep theirs."""
    where = ctx.walk.paths.get(id(module), "")
    costs = []
    for cost in counter_for(module)(module, ctx):
        key, flops = cost[0], cost[1]
        path = key if isinstance(key, tuple) else (key,)
        costs.append((path, int(flops), cost[2] if len(cost) > 2 else where))
    return costs


def register_counter(module_type: type, fn: CounterFn) -> CounterFn | None:
    """Count modules of `module_type` (and its subclasses) with `fn(module, ctx)`; returns the counter it replaces.

    `fn` returns an iterable of (name, forward FLOPs) pairs for the work the module does itself, and includes its
    children's costs through `ctx.count(child, "child_name")`. Every module of the tree must be counted or marked with
    `ctx.mark_counted(child)`; `count_forward` fails on any it did not reach."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_counter needs an nn.Module subclass, got {module_type!r}")
    if not callable(fn):
        raise TypeError(f"counter for {module_type.__name__} must be callable, got {fn!r}")
    previous = _COUNTERS.get(module_type)
    _COUNTERS[module_type] = fn
    return previous


def unregister_counter(module_type: type) -> CounterFn | None:
    """Remove a registered counter (e.g. a test's); returns it, or None if there was none."""
    return _COUNTERS.pop(module_type, None)


def is_lora_linear(module: nn.Module) -> bool:
    """LoRA wrappers are recognised by their parts, so qwen_mini never imports the lora package."""
    return all(hasattr(module, attr) for attr in ("base_layer", "lora_A", "lora_B", "scaling"))


def counter_for(module: nn.Module) -> CounterFn:
    """The counter of the module's own class, else a LoRA wrapper's, else the nearest registered base class's."""
    if type(module) in _COUNTERS:
        return _COUNTERS[type(module)]
    if is_lora_linear(module):
        return count_lora_linear
    for cls in type(module).__mro__[1:]:
        if cls in _COUNTERS:
            return _COUNTERS[cls]
    raise FlopCountError(f"no FLOP counter for module type {type(module).__module__}.{type(module).__qualname__}; "
                         "register one with qwen_mini.flops.register_counter(module_type, fn)")


# ---- counters for the model's modules ------------------------------------------------------------------------------

def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear or of a wrapper around one, read from the weight matrix (out x in)."""
    inner = module.base_layer if is_lora_linear(module) else module
    weight = getattr(inner, "weight", None)
    if weight is None or weight.dim() != 2:
        raise FlopCountError(f"cannot read the shape of {type(module).__name__}: no 2-D weight")
    out_features, in_features = weight.shape
    return int(in_features), int(out_features)


def count_linear(linear: nn.Linear, ctx: CountContext):
    in_features, out_features = linear_features(linear)
    out_features = ctx.out_features or out_features
    yield "matmul", matmul_flops(ctx.tokens, in_features, out_features, ctx.costs)
    if linear.bias is not None:
        yield "bias", ctx.tokens * out_features * ctx.costs["add"]


def count_lora_linear(module: nn.Module, ctx: CountContext):
    in_features, out_features = linear_features(module)
    out_features = ctx.out_features or out_features
    yield from ctx.count(module.base_layer, "base_layer", out_features=out_features)
    if getattr(module, "merged", False):  # the update lives in base_layer.weight: forward skips the adapter
        for part in (module.lora_A, module.lora_B, getattr(module, "lora_dropout", None)):
            if part is not None:
                ctx.mark_counted(part)
        return
    dropout = getattr(module, "lora_dropout", None)
    if dropout is not None:
        yield from ctx.count(dropout, "lora_dropout", in_features=in_features)
    yield from ctx.count(module.lora_A, "lora_A")
    yield from ctx.count(module.lora_B, "lora_B", out_features=out_features)
    yield "lora_scaling", ctx.tokens * out_features * ctx.costs["mul"]
    yield "lora_add", ctx.tokens * out_features * ctx.costs["add"]


def count_dropout(dropout: nn.Dropout, ctx: CountContext):
    # Training runs dropout: torch scales the Bernoulli mask by 1/(1-p), then multiplies (2 per element).
    if dropout.p > 0 and ctx.training:
        if ctx.in_features is None:
            raise FlopCountError("dropout needs its input width: count it through its parent with in_features=")
        yield "mask", ctx.tokens * ctx.in_features * (ctx.costs["div"] + ctx.costs["mul"])


def count_identity(module: nn.Module, ctx: CountContext):
    return ()


def count_embedding(embedding: nn.Embedding, ctx: CountContext):
    yield "lookup", 0  # a gather, no arithmetic


def count_rms_norm(norm: RMSNorm, ctx: CountContext):
    d, c, rows = norm.weight.shape[0], ctx.costs, ctx.tokens
    yield "square", rows * d * c["mul"]
    yield "mean", rows * ((d - 1) * c["add"] + c["div"])
    yield "eps", rows * c["add"]
    yield "rsqrt", rows * (c["sqrt"] + c["inv"])
    yield "normalize", rows * d * c["mul"]
    yield "weight", rows * d * c["mul"]


def count_rotary_tables(rotary: RotaryEmbedding, ctx: CountContext):
    # Computed once per forward for every position, shared by all layers.
    half = rotary.inv_freq.numel()
    yield "angles", ctx.tokens * half * ctx.costs["mul"]
    yield "cos", ctx.tokens * 2 * half * ctx.costs["cos"]
    yield "sin", ctx.tokens * 2 * half * ctx.costs["sin"]


def rotary_apply_flops(vectors: int, head_dim: int, costs: Mapping[str, int]) -> int:
    """x*cos + rotate_half(x)*sin for `vectors` head vectors: 2d multiplies, d/2 negations, d additions each."""
    return vectors * (2 * head_dim * costs["mul"] + head_dim // 2 * costs["neg"] + head_dim * costs["add"])


def count_attention(attn: Attention, ctx: CountContext):
    B, T, c = ctx.batch, ctx.seq, ctx.costs
    S = ctx.past + T  # keys each query sees: the cached ones and the new ones
    heads, kv_heads, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q_out = linear_features(attn.q_proj)[1]
    if q_out != heads * d:
        raise FlopCountError(f"attention layer {attn.layer_idx}: q_proj has {q_out} outputs but n_heads * head_dim "
                             f"= {heads} * {d}")
    counted_kv_heads = kv_heads if ctx.gqa == "real" else heads
    kv_width = counted_kv_heads * d if ctx.gqa == "mha" else None  # None: the projections' own width
    yield from ctx.count(attn.q_proj, "q_proj")
    yield from ctx.count(attn.k_proj, "k_proj", out_features=kv_width)
    yield from ctx.count(attn.v_proj, "v_proj", out_features=kv_width)
    yield "rope_q", rotary_apply_flops(ctx.tokens * heads, d, c)
    yield "rope_k", rotary_apply_flops(ctx.tokens * counted_kv_heads, d, c)
    per_head = B * heads  # score and value products run per query head whether or not k/v are shared
    yield "scores", per_head * matmul_flops(T, d, S, c)
    yield "scale", per_head * T * S * c["mul"]
    yield "softmax", per_head * T * (S * c["exp"] + (S - 1) * c["add"] + S * c["div"])
    yield "values", per_head * matmul_flops(T, S, d, c)
    yield from ctx.count(attn.o_proj, "o_proj")


def count_mlp(mlp: MLP, ctx: CountContext):
    intermediate, c = linear_features(mlp.gate_proj)[1], ctx.costs
    yield from ctx.count(mlp.gate_proj, "gate_proj")
    yield from ctx.count(mlp.up_proj, "up_proj")
    yield "silu", ctx.tokens * intermediate * (c["neg"] + c["exp"] + c["add"] + c["div"])
    yield "gate_times_up", ctx.tokens * intermediate * c["mul"]
    yield from ctx.count(mlp.down_proj, "down_proj")


def count_block(block: Block, ctx: CountContext):
    hidden = block.input_layernorm.weight.shape[0]
    yield from ctx.count(block.input_layernorm, "input_layernorm")
    yield from ctx.count(block.self_attn, "self_attn")
    yield "residual_attn", ctx.tokens * hidden * ctx.costs["add"]
    yield from ctx.count(block.post_attention_layernorm, "post_attention_layernorm")
    yield from ctx.count(block.mlp, "mlp")
    yield "residual_mlp", ctx.tokens * hidden * ctx.costs["add"]


def count_qwen(model: Qwen, ctx: CountContext):
    decoder = model.model
    ctx.mark_counted(decoder)
    ctx.mark_counted(decoder.layers)
    yield from ctx.count(decoder.embed_tokens, "embed_tokens")
    yield from ctx.count(decoder.rotary_emb, "rotary_emb")
    for i, layer in enumerate(decoder.layers):
        yield from ctx.count(layer, f"layers.{i}")
    yield from ctx.count(decoder.norm, "norm")
    # Training (qwen_mini.loss.causal_lm_loss) drops the last position, which has no next token to predict;
    # generation scores only the last position of each sequence.
    if ctx.include_loss:
        positions = ctx.batch * (ctx.seq - 1)
    else:
        positions = ctx.batch if ctx.logits == "last" else ctx.tokens
    yield from ctx.count(model.lm_head, "lm_head", tokens=positions, out_features=ctx.head_rows)
    if ctx.include_loss:
        vocab = linear_features(model.lm_head)[1]
        for name, flops in cross_entropy_flops(positions, vocab, ctx.costs).items():
            yield ("loss", name), flops, ""


for _type, _fn in ((nn.Linear, count_linear), (nn.Dropout, count_dropout), (nn.Identity, count_identity),
                   (nn.Embedding, count_embedding), (RMSNorm, count_rms_norm), (RotaryEmbedding, count_rotary_tables),
                   (Attention, count_attention), (MLP, count_mlp), (Block, count_block), (Qwen, count_qwen)):
    register_counter(_type, _fn)


# ---- entry points --------------------------------------------------------------------------------------------------

def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise FlopCountError(f"{name} must be a positive integer, got {value!r}")
    return value


def count_forward(model: nn.Module, batch: int, seq: int, gqa: str = "real", costs: Mapping[str, int] = COSTS,
                  include_loss: bool = True, *, past: int = 0, logits: str = "all", head_rows: int | None = None,
                  training: bool = True) -> FlopReport:
    """Forward FLOPs of `model` on `batch` sequences of `seq` tokens, per layer and component (see module docs).

    Generation: `past` keys already cached, `logits="last"` (only each sequence's last position is scored),
    `head_rows` LM-head rows scored (default: the vocabulary); `training=False`: no dropout."""
    batch, seq = _positive_int("batch", batch), _positive_int("seq", seq)
    if gqa not in GQA_MODES:
        raise FlopCountError(f"gqa must be one of {', '.join(GQA_MODES)}, got {gqa!r}")
    if include_loss and seq < 2:
        raise FlopCountError("a training window needs seq >= 2 (the loss predicts token t+1 from tokens <= t)")
    if isinstance(past, bool) or not isinstance(past, int) or past < 0:
        raise FlopCountError(f"past must be a non-negative integer (cached keys), got {past!r}")
    if logits not in ("all", "last"):
        raise FlopCountError(f"logits must be 'all' or 'last', got {logits!r}")
    if head_rows is not None:
        _positive_int("head_rows", head_rows)
    costs = resolve_costs(costs)
    walk = _Walk(paths={id(m): name for name, m in model.named_modules()})
    ctx = CountContext(batch, seq, gqa, costs, include_loss, walk, tokens=batch * seq, past=past, logits=logits,
                       head_rows=head_rows, training=training)
    walk.counted.add(id(model))
    rows = []
    for path, flops, module_path in _run_counter(model, ctx):
        layer, component = path[0], ".".join(path[1:]) or path[0]
        rows.append(FlopRow(layer, component, flops, module_path))
    missed = [name for name, m in model.named_modules() if id(m) not in walk.counted]
    if missed:
        raise FlopCountError(f"{len(missed)} module(s) were not counted, e.g. {missed[0]!r} "
                             f"({type(model.get_submodule(missed[0])).__name__}): the counter of its parent does not "
                             "know it; update the counter registered for the parent (qwen_mini.flops.register_counter)")
    name = getattr(getattr(model, "config", None), "name", "") or ""
    return FlopReport(rows, batch, seq, gqa, costs, include_loss, model_name=str(name))


def training_step_flops(model: nn.Module, batch: int, ctx: int, gqa: str = "real") -> int:
    """FLOPs of one training step (forward + backward, loss included) on `batch` windows of `ctx` tokens."""
    return count_forward(model, batch, ctx, gqa=gqa).step


def eval_flops(model: nn.Module, batch: int, ctx: int, gqa: str = "real") -> int:
    """FLOPs of one evaluation forward (loss included, no backward, no dropout) on `batch` windows of `ctx`."""
    return count_forward(model, batch, ctx, gqa=gqa, training=False).forward


@dataclass(frozen=True)
class GenerationFlops:
    """FLOPs of one `generate` call: the prefill of the prompts and the decode forwards of every row."""
    prefill: int
    decode: int
    prefill_tokens: int  # prompts x padded prompt length
    decode_tokens: int  # rows x tokens fed back

    @property
    def total(self) -> int:
        return self.prefill + self.decode


def generation_flops(model: nn.Module, prompts: int, prompt_len: int, rows: int, new_tokens: int,
                     gqa: str = "real", head_rows: int | None = None, costs: Mapping[str, int] = COSTS
                     ) -> GenerationFlops:
    """FLOPs of generating `new_tokens` tokens per row for `rows` rows (prompts x samples) from `prompts` prompts
    left-padded to `prompt_len`, with a KV cache (the module docstring's rules): the prefill once per prompt, then
    new_tokens - 1 decode forwards of every row, the j-th attending to prompt_len + j + 1 keys."""
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 0:
        raise FlopCountError(f"new_tokens must be a non-negative integer, got {new_tokens!r}")
    return generation_counter(model, prompts, prompt_len, rows, gqa, head_rows, costs).at(new_tokens)


@dataclass(frozen=True)
class GenerationCounter:
    """`generation_flops` of one batch of prompts, for any number of new tokens: counted once (the prefill, and a
    decode forward's count, which is affine in the cached keys), then summed in closed form, so a generate call can
    ask for its FLOPs so far at every step for the price of arithmetic."""
    prefill: int
    first_decode: int  # a decode forward of every row attending to prompt_len + 1 keys
    slope: int  # what one more cached key adds to a decode forward
    prefill_tokens: int
    rows: int

    def at(self, new_tokens: int) -> GenerationFlops:
        fed = max(new_tokens - 1, 0)
        decode = fed * self.first_decode + self.slope * fed * (fed - 1) // 2
        return GenerationFlops(self.prefill, decode, self.prefill_tokens, self.rows * fed)


def generation_counter(model: nn.Module, prompts: int, prompt_len: int, rows: int, gqa: str = "real",
                       head_rows: int | None = None, costs: Mapping[str, int] = COSTS) -> GenerationCounter:
    """The GenerationCounter of `prompts` prompts left-padded to `prompt_len` and `rows` generated rows. A decode
    forward's count is taken at prompt_len and prompt_len + 1 cached keys (checked against prompt_len + 2)."""
    prompts, prompt_len, rows = (_positive_int(name, value) for name, value in
                                 (("prompts", prompts), ("prompt_len", prompt_len), ("rows", rows)))
    options = dict(gqa=gqa, costs=costs, include_loss=False, logits="last", head_rows=head_rows, training=False)
    prefill = count_forward(model, prompts, prompt_len, **options).forward
    at = [count_forward(model, rows, 1, past=prompt_len + j, **options).forward for j in range(3)]
    slope = at[1] - at[0]
    if at[2] - at[1] != slope:
        raise FlopCountError("a decode step's FLOPs are not affine in the cached keys: some counter depends on "
                             "`past` in another way; sum the steps one by one")
    return GenerationCounter(prefill, at[0], slope, prompts * prompt_len, rows)


def static_decode_flops(model: nn.Module, rows: int, forwards: int, tokens_per_row: int, cache_slots: int,
                        gqa: str = "real", head_rows: int | None = None, costs: Mapping[str, int] = COSTS) -> int:
    """Decode FLOPs of compiled decoding over a static KV cache (`generate(compile=True)`): each of `forwards` steps
    computes `tokens_per_row` slots of every row, padding and finished rows included, and every slot attends to all
    `cache_slots` slots of the cache (a fixed-shape graph cannot skip the empty ones)."""
    if not forwards:
        return 0
    return forwards * count_forward(model, rows, tokens_per_row, past=cache_slots - tokens_per_row, gqa=gqa,
                                    costs=costs, include_loss=False, logits="last", head_rows=head_rows,
                                    training=False).forward

