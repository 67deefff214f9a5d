"""Shared-prefix (cascade) decoding, issue 25: K samples of a prompt read one copy of its keys/values plus their own
suffix. The reference is the unshared path: each prompt's cache copied to its K rows (`KVCache.repeat_interleave`)
or the prompt itself repeated K times, whose attention is one plain SDPA over the whole row."""
import math

import pytest
import torch
from conftest import PARITY_CONFIGS, left_padded_batch, random_model

from qwen_mini import PRESETS, QwenConfig, char_tokenizer, generate
from qwen_mini.generate import DecodeStats, decode_step
from qwen_mini.model import merge_attention, partial_attention, shared_prefix_attention

CONFIG = PARITY_CONFIGS["gqa7to1_tied"]


def test_merge_of_two_partial_attentions_is_the_softmax_over_the_concatenation_by_hand():
    """One query, keys split 2 + 1: scores 0, ln 2 | ln 3 (q = (1, 0) in 2 dims, so a score is k_0 / sqrt(2)), so
    the weights of the whole softmax are 1/6, 2/6, 3/6 and the output their average of the values 10, 20, 30."""
    q = torch.tensor([[[1.0, 0.0]]])
    keys = torch.tensor([[[0.0, 0.0], [math.log(2) * math.sqrt(2), 0.0], [math.log(3) * math.sqrt(2), 0.0]]])
    values = torch.tensor([[[10.0, 0.0], [20.0, 0.0], [30.0, 0.0]]])
    everything = torch.ones(1, 1, 3, dtype=torch.bool)
    out_a, lse_a = partial_attention(q, keys[:, :2], values[:, :2], everything[..., :2])
    out_b, lse_b = partial_attention(q, keys[:, 2:], values[:, 2:], everything[..., 2:])
    assert lse_a.item() == pytest.approx(math.log(3)) and lse_b.item() == pytest.approx(math.log(3))
    assert out_a[0, 0, 0].item() == pytest.approx((10 + 2 * 20) / 3)
    merged = merge_attention(out_a, lse_a, out_b, lse_b)
    assert merged[0, 0, 0].item() == pytest.approx((10 + 2 * 20 + 3 * 30) / 6)
    # (batch, heads, N, d) on CPU runs the fused kernel: the same partial results
    fused_out, fused_lse = partial_attention(q[None], keys[None, :, :2], values[None, :, :2], everything[None, ..., :2])
    torch.testing.assert_close((fused_out[0], fused_lse[0]), (out_a, lse_a), atol=1e-6, rtol=1e-6)
    # a part whose keys are all masked out weighs nothing (not NaN)
    none_seen = partial_attention(q, keys[:, 2:], values[:, 2:], torch.zeros(1, 1, 1, dtype=torch.bool))
    assert torch.equal(merge_attention(out_a, lse_a, *none_seen), out_a)


def test_shared_prefix_attention_equals_sdpa_over_each_row_with_its_own_copy_of_the_prompt():
    """Random tensors, GQA (6 query heads on 2 key/value heads), left-padded prompts, 2 tokens per row with the
    suffix mask of a decode chunk: the same outputs as one SDPA over [prompt copy, suffix] per row."""
    gen = torch.Generator().manual_seed(0)
    prompts, samples, heads, kv_heads, T, D, P, S = 2, 3, 6, 2, 2, 4, 5, 3
    rows = prompts * samples
    q = torch.randn(rows, heads, T, D, generator=gen)
    prefix_k, prefix_v = torch.randn(2, prompts, kv_heads, P, D, generator=gen)
    k, v = torch.randn(2, rows, kv_heads, S, D, generator=gen)
    prefix_mask = torch.tensor([[False, False, True, True, True], [True] * P])
    mask = torch.rand(rows, 1, T, S, generator=gen) < 0.7
    mask[..., 0] = True
    out = shared_prefix_attention(q, k, v, mask, prefix_k, prefix_v, prefix_mask)
    full_k = torch.cat([prefix_k.repeat_interleave(samples, 0), k], dim=2).repeat_interleave(heads // kv_heads, 1)
    full_v = torch.cat([prefix_v.repeat_interleave(samples, 0), v], dim=2).repeat_interleave(heads // kv_heads, 1)
    full_mask = torch.cat([prefix_mask.repeat_interleave(samples, 0)[:, None, None].expand(rows, 1, T, P), mask], -1)
    reference = torch.nn.functional.scaled_dot_product_attention(q, full_k, full_v, attn_mask=full_mask)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)


def test_decode_logits_within_1e_5_of_the_copied_cache_and_kv_memory_is_one_prompt_plus_k_suffixes():
    model = random_model(CONFIG, seed=31)
    input_ids, mask = left_padded_batch(CONFIG.vocab_size, [11, 4, 8], seed=31)
    K, suffix = 5, 6
    gen = torch.Generator().manual_seed(31)
    with torch.inference_mode():
        prompt_cache = model.new_cache(3, input_ids.shape[1])
        model(input_ids, mask, kv_cache=prompt_cache)
        shared = prompt_cache.share(K, suffix_len=suffix)
        copies = prompt_cache.repeat_interleave(K, max_len=input_ids.shape[1] + suffix)
        for _ in range(4):
            tokens = torch.randint(0, CONFIG.vocab_size, (3 * K, 1), generator=gen)
            real = torch.ones_like(tokens, dtype=torch.bool)
            torch.testing.assert_close(decode_step(model, shared, tokens, real, model.lm_head.weight),
                                       decode_step(model, copies, tokens, real, model.lm_head.weight),
                                       atol=1e-5, rtol=0)
    assert torch.equal(shared.positions, copies.positions)
    per_position = CONFIG.num_key_value_heads * CONFIG.head_dim * 2 * CONFIG.num_hidden_layers  # k and v, all layers
    held = sum(t.numel() for t in shared.k + shared.v + shared.prefix.k + shared.prefix.v)
    assert held == per_position * (3 * input_ids.shape[1] + 3 * K * suffix)  # 3 prompts once + 15 suffixes
    assert sum(t.numel() for t in copies.k + copies.v) == per_position * 3 * K * (input_ids.shape[1] + suffix)
    with pytest.raises(ValueError, match="share a prefix"):
        shared.repeat_interleave(2)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "top_p": 0.9}])
@pytest.mark.parametrize("jump_forward", [False, True])
def test_grammar_forecast_tokens_identical_to_each_prompt_repeated(sampling, jump_forward):
    """Ragged prompts (left padding), the number grammar, greedy and seeded sampling, plain and jump-forward: the
    rows of num_samples=K (shared prompt) write the very tokens of the prompts repeated K times (no sharing)."""
    from forecasting.grammar import NumberGrammar

    model, tokenizer = random_model(QwenConfig(**PRESETS["tiny"], name="tiny"), seed=32), char_tokenizer()
    input_ids, mask = tokenizer.encode_batch(["0.52,1.10;0.61,0.98;", "1.20,0.33;", "13.1,0.2;0.4,2.25;"])
    K = 3

    def run(ids, attention_mask, samples):
        grammar = NumberGrammar(tokenizer, model.config.vocab_size, 9, n_vars=2, horizon=4)
        stats = DecodeStats()
        tokens = generate(model, ids, attention_mask, max_new_tokens=grammar.max_new_tokens(), num_samples=samples,
                          stop_token_ids=[grammar.stop_id], allowed_tokens=grammar,
                          candidate_ids=grammar.candidate_ids, jump_forward=jump_forward, stats=stats,
                          generator=torch.Generator().manual_seed(8), **sampling)
        return tokens, stats

    shared, shared_stats = run(input_ids, mask, K)
    copies, copies_stats = run(input_ids.repeat_interleave(K, 0), mask.repeat_interleave(K, 0), 1)
    assert torch.equal(shared, copies)
    assert shared_stats.forwards == copies_stats.forwards
    if sampling:
        assert len({tuple(row) for row in shared[:K].tolist()}) > 1  # the samples of a prompt really differ
