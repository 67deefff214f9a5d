"""FLOP counting: hand arithmetic on a tiny config, torch's own FlopCounterMode, scaling laws, LoRA, GQA, registry.

The expected numbers are written out as arithmetic from the counting rules in qwen_mini/flops.py's docstring
(matmul (m x n).(n x p) = m*p*(2n-1), bias m*p, exp/log/sqrt/sin/cos = 10, every other primitive 1)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from qwen_mini import Qwen, QwenConfig
from qwen_mini.flop_report import FlopCountError
from qwen_mini.flops import (
    COSTS,
    count_forward,
    eval_flops,
    generation_flops,
    matmul_flops,
    register_counter,
    training_step_flops,
    unregister_counter,
)
from qwen_mini.model import MLP, meta_model

# Hidden 8, 4 query heads and 2 key/value heads of width 4 (heads * head_dim = 16 != hidden: a wrong width shows),
# MLP 12, vocabulary 11, 2 layers. Counted at batch 2 x seq 3 = 6 tokens.
HAND = QwenConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=4, tie_word_embeddings=False, name="hand")
B, T, N = 2, 3, 6

# RMSNorm over 6 rows of width 8: square 8, mean 7 adds + 1 div, eps 1, sqrt 10 + inverse 1, normalize 8, weight 8.
HAND_NORM = 6 * (8 + (7 + 1) + 1 + (10 + 1) + 8 + 8)                      # 264
HAND_ATTENTION = (
    6 * 16 * (2 * 8 - 1) + 6 * 16          # q_proj: 6 x 8 . 8 x 16, + bias
    + 6 * 8 * (2 * 8 - 1) + 6 * 8          # k_proj: 2 kv heads x 4 = 8 outputs, + bias
    + 6 * 8 * (2 * 8 - 1) + 6 * 8          # v_proj
    + 6 * 4 * (4 + 2 + 4 + 4)              # rotary on q: per head vector x*cos 4, negate half 2, *sin 4, add 4
    + 6 * 2 * (4 + 2 + 4 + 4)              # rotary on k: 2 kv heads
    + 2 * 4 * (3 * 3 * (2 * 4 - 1))        # scores: per (batch, query head) 3 x 4 . 4 x 3
    + 2 * 4 * (3 * 3)                      # scale: one multiply per score
    + 2 * 4 * 3 * (3 * 10 + 2 + 3)         # softmax per row of 3: 3 exp, 2 adds, 3 divides
    + 2 * 4 * (3 * 4 * (2 * 3 - 1))        # values: 3 x 3 . 3 x 4
    + 6 * 8 * (2 * 16 - 1)                 # o_proj: 6 x 16 . 16 x 8, no bias
)                                                                          # 6960
HAND_MLP = (
    6 * 12 * (2 * 8 - 1) * 2               # gate_proj and up_proj: 6 x 8 . 8 x 12
    + 6 * 12 * (1 + 10 + 1 + 1)            # SiLU = x / (1 + exp(-x)): negate, exp, add, divide
    + 6 * 12                               # gate * up
    + 6 * 8 * (2 * 12 - 1)                 # down_proj: 6 x 12 . 12 x 8
)                                                                          # 4272
HAND_BLOCK = HAND_NORM + HAND_ATTENTION + 6 * 8 + HAND_NORM + HAND_MLP + 6 * 8  # two residual adds: 11856
HAND_ROTARY_TABLES = 6 * 2 + 6 * 4 * 10 + 6 * 4 * 10                     # angles (d/2), cos and sin (d): 492
# Training drops the last position of each window (no next token): LM head and loss over 2 x (3 - 1) = 4 positions.
HAND_LM_HEAD = 4 * 11 * (2 * 8 - 1)                                       # 660
HAND_LOSS = 4 * (11 * 10 + 10 + 10 + 1) + (3 + 1)  # per position: 11 exp, 10 adds, log, minus target; mean: 528
HAND_FORWARD = 0 + HAND_ROTARY_TABLES + 2 * HAND_BLOCK + HAND_NORM + HAND_LM_HEAD + HAND_LOSS  # 25656
HAND_STEP = 3 * HAND_FORWARD                                              # backward = 2 x forward: 76968


class StandInLoRALinear(nn.Module):
    """lora.LoRALinear's contract (base_layer, lora_A, lora_B, scaling, lora_dropout), written here so the
    counting tests neither depend on the lora package nor on the counter knowing its class."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        return self.base_layer(x) + self.scaling * self.lora_B(self.lora_A(self.lora_dropout(x)))


def inject_stand_in(model: Qwen, rank: int, targets=("q_proj", "v_proj"), dropout: float = 0.0) -> Qwen:
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in targets:
                if hasattr(parent, name):
                    setattr(parent, name, StandInLoRALinear(getattr(parent, name), rank, 2 * rank, dropout))
    return model


def rows_of(report, layer: str, prefix: str = "") -> int:
    return report.select(lambda r: r.layer == layer and r.component.startswith(prefix))


# ---- hand-computed counts ------------------------------------------------------------------------------------------

def test_hand_counts_per_component():
    report = count_forward(meta_model(HAND), B, T)
    assert rows_of(report, "layers.0", "input_layernorm.") == HAND_NORM
    assert rows_of(report, "layers.1", "post_attention_layernorm.") == HAND_NORM
    assert rows_of(report, "norm") == HAND_NORM
    assert rows_of(report, "layers.0", "self_attn.") == HAND_ATTENTION
    assert rows_of(report, "layers.1", "mlp.") == HAND_MLP
    assert rows_of(report, "layers.1") == HAND_BLOCK
    assert rows_of(report, "embed_tokens") == 0
    assert rows_of(report, "rotary_emb") == HAND_ROTARY_TABLES
    assert rows_of(report, "lm_head") == HAND_LM_HEAD
    assert rows_of(report, "loss") == HAND_LOSS
    # individual attention terms, the ones a spreadsheet usually gets wrong
    assert rows_of(report, "layers.0", "self_attn.k_proj.") == 6 * 8 * 15 + 6 * 8
    assert rows_of(report, "layers.0", "self_attn.softmax") == 2 * 4 * 3 * 35


def test_hand_count_whole_step():
    model = meta_model(HAND)
    report = count_forward(model, B, T)
    assert report.forward == HAND_FORWARD == 25656
    assert report.backward == 2 * HAND_FORWARD
    assert report.step == HAND_STEP == 76968
    assert training_step_flops(model, B, T) == HAND_STEP
    assert all(isinstance(row.forward, int) for row in report.rows)
    assert list(report.by_layer()) == ["embed_tokens", "rotary_emb", "layers.0", "layers.1", "norm", "lm_head", "loss"]
    # plain forward (generation, evaluation): logits for all 6 positions, no loss
    plain = count_forward(model, B, T, include_loss=False)
    assert plain.forward == HAND_FORWARD - HAND_LOSS - HAND_LM_HEAD + 6 * 11 * (2 * 8 - 1)


def test_report_dict_and_table():
    report = count_forward(meta_model(HAND), B, T)
    d = report.to_dict()
    assert (d["forward"], d["backward"], d["step"]) == (HAND_FORWARD, 2 * HAND_FORWARD, HAND_STEP)
    assert sum(layer["total"] for layer in d["layers"]) == HAND_STEP
    assert d["gqa"] == "real" and d["costs"] == dict(COSTS)
    table = report.table()
    assert "layers.1" in table and "share" in table and f"{HAND_STEP:,}" in table and "gqa=real" in table
    assert "self_attn.scores" in report.table(by="component")
    with pytest.raises(FlopCountError, match="choose 'layer' or 'component'"):
        report.table(by="module")


def test_cost_table_is_overridable():
    model = meta_model(HAND)
    cheap_exp = count_forward(model, B, T, costs={"exp": 1})
    exponentials = (2 * (2 * 4 * 3 * 3)   # softmax: 2 layers x (batch x heads x 3 x 3 scores)
                    + 2 * 6 * 12          # SiLU: 2 layers x 6 tokens x 12
                    + 4 * 11)             # loss: 4 positions x 11 logits
    assert count_forward(model, B, T).forward - cheap_exp.forward == (10 - 1) * exponentials
    with pytest.raises(FlopCountError, match="unknown primitive 'tanh'"):
        count_forward(model, B, T, costs={"tanh": 5})
    with pytest.raises(FlopCountError, match="non-negative integer"):
        count_forward(model, B, T, costs={"exp": 2.5})
    with pytest.raises(TypeError):
        COSTS["exp"] = 1  # the documented default cannot drift


def test_matmul_rule():
    assert matmul_flops(2, 3, 4) == 2 * 4 * (3 + 2)  # 3 multiplications + 2 additions per output
    assert matmul_flops(1, 1, 1) == 1


# ---- torch's own counter -------------------------------------------------------------------------------------------

def flop_counts(run) -> dict[str, int]:
    """FlopCounterMode's FLOPs per module (key without the root class name: "model.layers.0.self_attn")."""
    with FlopCounterMode(display=False) as counter:
        run()
    counts = counter.get_flop_counts()
    return {key.partition(".")[2]: sum(ops.values()) for key, ops in counts.items() if key.startswith("Qwen.")}


def test_matches_torch_flop_counter_on_every_linear():
    """torch counts 2*m*n*p per product; we count m*p*(2n-1) + m*p per bias: they differ by m*p exactly on each
    bias-free linear and agree on each linear with a bias."""
    torch.manual_seed(0)
    model = inject_stand_in(Qwen(HAND), rank=2, targets=("q_proj", "v_proj", "down_proj")).eval()
    ids = torch.randint(0, HAND.vocab_size, (B, 5))
    with torch.no_grad():
        torch_counts = flop_counts(lambda: model(ids))
    ours = count_forward(model, B, 5, include_loss=False)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * (7 + 2 * 3) + 1  # 7 projections + 3 adapters x (A, B) per layer, LM head
    tokens = B * 5
    for name, linear in linears:
        matmul = ours.select(lambda r, name=name: r.module == name and r.component.endswith("matmul"))
        bias = ours.select(lambda r, name=name: r.module == name and r.component.endswith("bias"))
        assert torch_counts[name] - matmul == tokens * linear.out_features, name
        if linear.bias is not None:
            assert bias == tokens * linear.out_features and matmul + bias == torch_counts[name], name
        else:
            assert bias == 0, name


def test_attention_products_match_torch_flop_counter():
    """Scores and values: torch counts 4*B*H*T*T*d; ours is smaller by the m*p terms B*H*(T*T + T*d).

    On CPU the fused SDPA kernel (aten._scaled_dot_product_flash_attention_for_cpu) has no entry in torch's FLOP
    registry, so FlopCounterMode sees 0 FLOPs there; the math backend runs two counted bmm's."""
    torch.manual_seed(0)
    model = Qwen(HAND).eval()
    seq = 5
    ids = torch.randint(0, HAND.vocab_size, (B, seq))
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")

    def attention_core(counts, i):
        return counts[f"model.layers.{i}.self_attn"] - sum(counts[f"model.layers.{i}.self_attn.{p}"]
                                                          for p in projections)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        math_counts = flop_counts(lambda: model(ids))
    with torch.no_grad():
        fused_counts = flop_counts(lambda: model(ids))
    ours = count_forward(model, B, seq, include_loss=False)
    H, d = HAND.num_attention_heads, HAND.head_dim
    assert 4 * B * H * seq * seq * d == attention_core(math_counts, 0)
    for i in range(HAND.num_hidden_layers):
        products = rows_of(ours, f"layers.{i}", "self_attn.scores") + rows_of(ours, f"layers.{i}", "self_attn.values")
        assert attention_core(math_counts, i) - products == B * H * (seq * seq + seq * d)
        assert attention_core(fused_counts, i) in (0, attention_core(math_counts, i))


def test_training_lm_head_positions_match_torch_flop_counter():
    """The trainer's loss (qwen_mini.loss.causal_lm_loss) runs the LM head on batch x (seq-1) positions."""
    from qwen_mini.loss import causal_lm_loss
    torch.manual_seed(0)
    model = Qwen(HAND).eval()
    seq = 5
    ids = torch.randint(0, HAND.vocab_size, (B, seq))
    with torch.no_grad(), FlopCounterMode(display=False) as with_loss:
        causal_lm_loss(model, ids, ids)
    with torch.no_grad(), FlopCounterMode(display=False) as body:
        model.hidden_states(ids)
    lm_head_torch = with_loss.get_total_flops() - body.get_total_flops()
    ours = rows_of(count_forward(model, B, seq), "lm_head")
    positions = B * (seq - 1)
    assert lm_head_torch - ours == positions * HAND.vocab_size


# ---- scaling laws --------------------------------------------------------------------------------------------------

def test_forward_is_linear_in_batch():
    model = inject_stand_in(meta_model(HAND), rank=2)
    one, three = count_forward(model, 1, 7), count_forward(model, 3, 7)
    assert three.forward == 3 * one.forward
    for a, b in zip(one.rows, three.rows, strict=True):
        assert b.forward == 3 * a.forward, (a.layer, a.component)


ATTENTION_PRODUCTS = ("self_attn.scores", "self_attn.scale", "self_attn.softmax", "self_attn.values")


def test_ctx_is_quadratic_only_in_attention():
    model = inject_stand_in(meta_model(HAND), rank=2)
    reports = [count_forward(model, 2, seq) for seq in (4, 5, 6, 7)]
    for i, row in enumerate(reports[0].rows):
        f = [r.rows[i].forward for r in reports]
        second = [f[k + 2] - 2 * f[k + 1] + f[k] for k in range(2)]
        if row.component in ATTENTION_PRODUCTS:
            assert second[0] == second[1] > 0, row.component  # exactly quadratic
        else:
            assert second == [0, 0], (row.layer, row.component)  # linear (affine: the loss drops one position)


# ---- LoRA and GQA --------------------------------------------------------------------------------------------------

def test_lora_adds_exactly_the_adapter_terms():
    rank, h, q_out, kv_out = 3, 8, 16, 8
    base = count_forward(meta_model(HAND), B, T)
    adapted = count_forward(inject_stand_in(meta_model(HAND), rank), B, T)
    per_layer = (6 * rank * (2 * h - 1) + 6 * q_out * (2 * rank - 1) + 6 * q_out + 6 * q_out    # q: A, B, scale, add
                 + 6 * rank * (2 * h - 1) + 6 * kv_out * (2 * rank - 1) + 6 * kv_out + 6 * kv_out)  # v
    assert adapted.forward - base.forward == HAND.num_hidden_layers * per_layer
    assert adapted.select(lambda r: ".base_layer." in r.component) == \
        base.select(lambda r: r.component.startswith(("self_attn.q_proj.", "self_attn.v_proj.")))
    with_dropout = count_forward(inject_stand_in(meta_model(HAND), rank, dropout=0.1), B, T)
    assert with_dropout.forward - adapted.forward == HAND.num_hidden_layers * 2 * (6 * h * 2)  # mask / (1-p), *


def test_real_lora_package_counts_like_the_contract():
    lora = pytest.importorskip("lora")
    model = meta_model(HAND)
    lora.inject(model, 3, 6, targets=("q_proj", "v_proj", "gate_proj"))
    stand_in = inject_stand_in(meta_model(HAND), 3, targets=("q_proj", "v_proj", "gate_proj"))
    assert count_forward(model, B, T).forward == count_forward(stand_in, B, T).forward
    lora.merge_all(model)  # a merged adapter is skipped by forward: only the base linears remain
    assert count_forward(model, B, T).forward == HAND_FORWARD


def test_gqa_real_is_cheaper_than_mha_by_the_kv_terms():
    model = meta_model(HAND)
    real, mha = count_forward(model, B, T, gqa="real"), count_forward(model, B, T, gqa="mha")
    extra_width = (4 - 2) * 4  # (query heads - kv heads) x head_dim more k and v outputs
    per_layer = 2 * (6 * extra_width * (2 * 8 - 1) + 6 * extra_width) + 6 * (4 - 2) * (4 + 2 + 4 + 4)  # k, v, rope k
    assert real.forward < mha.forward
    assert mha.forward - real.forward == HAND.num_hidden_layers * per_layer
    assert "multi-head" in mha.table() and "gqa=mha" in mha.table()
    # an adapter on k_proj is as wide as the counted projection
    lora_k = inject_stand_in(meta_model(HAND), 2, targets=("k_proj",))
    difference = count_forward(lora_k, B, T, gqa="mha").forward - count_forward(lora_k, B, T).forward
    lora_b_wider = 6 * extra_width * (2 * 2 - 1) + 2 * 6 * extra_width  # B product, scale, add on the extra outputs
    assert difference == HAND.num_hidden_layers * (per_layer + lora_b_wider)
    # without grouping the two modes agree
    mha_model = meta_model(QwenConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2))
    assert count_forward(mha_model, B, T).forward == count_forward(mha_model, B, T, gqa="mha").forward
    with pytest.raises(FlopCountError, match="gqa must be one of real, mha"):
        count_forward(model, B, T, gqa="grouped")


# ---- the registry and the tree walk --------------------------------------------------------------------------------

def test_uncounted_module_is_an_error():
    model = meta_model(HAND)
    model.model.layers[1].mlp.extra = nn.Linear(8, 8, device="meta")
    with pytest.raises(FlopCountError, match=r"model\.layers\.1\.mlp\.extra"):
        count_forward(model, B, T)


def test_register_counter_for_a_new_module_type():
    class ScaledMLP(MLP):
        """An MLP variant another package might add."""

    class Unknown(nn.Module):
        pass

    def count_scaled_mlp(module, ctx):
        yield from ctx.count(module.gate_proj, "gate_proj")
        for child in (module.up_proj, module.down_proj):
            ctx.mark_counted(child)
        yield "everything_else", 1000

    model = meta_model(HAND)
    with torch.device("meta"):
        model.model.layers[0].mlp = ScaledMLP(HAND)
    # unregistered subclass: the nearest registered base class (MLP) counts it
    assert count_forward(model, B, T).forward == HAND_FORWARD
    previous = register_counter(ScaledMLP, count_scaled_mlp)
    try:
        assert previous is None
        expected = HAND_FORWARD - HAND_MLP + 6 * 12 * (2 * 8 - 1) + 1000
        assert count_forward(model, B, T).forward == expected
    finally:
        unregister_counter(ScaledMLP)
    model.model.layers[0].mlp = Unknown()
    with pytest.raises(FlopCountError, match="no FLOP counter for module type .*Unknown.*register_counter"):
        count_forward(model, B, T)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_counter(int, count_scaled_mlp)


def test_bad_settings_are_reported():
    model = meta_model(HAND)
    with pytest.raises(FlopCountError, match="batch must be a positive integer"):
        count_forward(model, 0, T)
    with pytest.raises(FlopCountError, match="seq >= 2"):
        count_forward(model, B, 1)


# ---- the full-size model, on the meta device -----------------------------------------------------------------------

def test_full_size_model_on_meta_device_matches_the_rule_of_thumb():
    """Independent estimate: forward ~ 2 FLOPs per weight per token + the attention products 4*B*H*T^2*d."""
    config = QwenConfig.from_name("qwen2.5-0.5b")
    model = meta_model(config)
    assert all(p.is_meta for p in model.parameters())
    batch, ctx = 4, 512
    report = count_forward(model, batch, ctx)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))  # lm_head included
    estimate = (2 * batch * ctx * weights
                + 4 * batch * config.num_attention_heads * ctx ** 2 * config.head_dim * config.num_hidden_layers)
    assert math.isclose(report.forward, estimate, rel_tol=0.01)
    assert training_step_flops(model, batch, ctx) == 3 * report.forward


def test_coursework_figure_with_gqa_mha():
    """Seed reports 000 and 004 count one training step by hand (batch 4 x ctx 512, LoRA r=4 on q and v, k/v as
    multi-head attention): 6.77e12 FLOPs. Ours under the same convention lands within 0.5 % of it."""
    model = inject_stand_in(meta_model(QwenConfig.from_name("qwen2.5-0.5b")), 4)
    step = training_step_flops(model, 4, 512, gqa="mha")
    assert abs(step / 6.77e12 - 1) < 0.005, step
    assert training_step_flops(model, 4, 512) < step  # real GQA: fewer k/v FLOPs


# ---- evaluation and KV-cache generation: hand arithmetic ------------------------------------------------------------
# Per token of HAND: rotary tables 82, RMSNorm 44; per token and layer: q/k/v/o projections + rotary on q and k
# (256 + 128 + 128 + 248 + 56 + 28 = 844), MLP 712, two norms 88, two residual adds 16: 1660. Per layer, sequence
# and query head, T queries over S keys: scores T*S*(2*4-1), scale T*S, softmax T*(10S + S-1 + S), values
# T*4*(2S-1). The LM head: (2*8-1) per scored position and head row.

def hand_attention_core(T: int, S: int) -> int:
    return T * S * 7 + T * S + T * (10 * S + (S - 1) + S) + T * 4 * (2 * S - 1)


def hand_forward(sequences: int, T: int, S: int, scored: int, head_rows: int = 11) -> int:
    tokens = sequences * T
    return (tokens * 82 + 2 * (tokens * 1660 + sequences * 4 * hand_attention_core(T, S)) + tokens * 44
            + scored * head_rows * 15)


def test_hand_forward_formula_reproduces_the_training_count():
    assert hand_forward(B, T, T, B * (T - 1)) + HAND_LOSS == HAND_FORWARD


def test_eval_is_the_forward_with_loss_without_dropout():
    assert eval_flops(meta_model(HAND), B, T) == HAND_FORWARD
    with_dropout = inject_stand_in(meta_model(HAND), 2, dropout=0.1)
    # training counts the dropout mask (2 per input element of each adapter: 2 layers x q, v x 6 tokens x 8 wide)
    mask = 2 * 2 * 6 * 8 * 2
    assert count_forward(with_dropout, B, T).forward - eval_flops(with_dropout, B, T) == mask


def test_generation_prefills_once_per_prompt_and_decodes_over_the_cache():
    model = meta_model(HAND)
    # 2 prompts left-padded to 3 tokens, 2 samples each (4 rows), 4 new tokens: 3 fed back, each attending to the
    # prompt, the tokens fed before it and itself; the LM head scores 5 candidate rows at the last position only.
    got = generation_flops(model, prompts=2, prompt_len=3, rows=4, new_tokens=4, head_rows=5)
    prefill = hand_forward(2, 3, 3, scored=2, head_rows=5)
    decode = sum(hand_forward(4, 1, 3 + j + 1, scored=4, head_rows=5) for j in range(3))
    assert (got.prefill, got.decode, got.total) == (prefill, decode, prefill + decode)
    assert (got.prefill_tokens, got.decode_tokens) == (6, 12)
    one = generation_flops(model, prompts=2, prompt_len=3, rows=4, new_tokens=1, head_rows=5)
    assert one.decode == 0 and one.prefill == prefill  # a single new token comes from the prefill's logits
    mha = generation_flops(model, prompts=2, prompt_len=3, rows=4, new_tokens=4, head_rows=5, gqa="mha")
    # mha: k and v projections 16 wide instead of 8 (with bias), rotary on 4 k heads instead of 2, per layer
    extra_per_token = 2 * (16 * 15 + 16 - (8 * 15 + 8)) + 2 * 14
    assert mha.total - got.total == 2 * extra_per_token * (6 + 12)
