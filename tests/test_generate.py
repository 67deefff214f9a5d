"""KV-cache correctness and generation: against the full forward, per-sample runs, HF generate and hand cases."""
import math

import pytest
import torch
from conftest import PARITY_CONFIGS, hf_reference, left_padded_batch, random_model, write_checkpoint

from qwen_mini import PRESETS, QwenConfig, char_tokenizer, from_pretrained, generate, sample_next
from qwen_mini.generate import DecodeStats, inverse_transform

CONFIG = PARITY_CONFIGS["gqa7to1_tied"]
TINY = QwenConfig(**PRESETS["tiny"], name="tiny")


def test_prefill_plus_incremental_steps_equal_full_forward():
    model = random_model(CONFIG, seed=1)
    input_ids, mask = left_padded_batch(CONFIG.vocab_size, [14, 9, 3], seed=1)
    with torch.no_grad():
        full = model(input_ids, mask)
        cache = model.new_cache(3, 20)
        pieces = [model(input_ids[:, a:b], mask[:, a:b], kv_cache=cache)
                  for a, b in [(0, 8), (8, 9), (9, 12), (12, 14)]]
    incremental = torch.cat(pieces, dim=1)
    assert ((incremental - full).abs() * mask[..., None]).max().item() <= 1e-5
    assert cache.length == 14


def test_cache_overflow_is_a_clear_error():
    model = random_model(CONFIG)
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache holds 4 positions"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


def test_batched_left_padded_greedy_equals_per_sample():
    model = random_model(CONFIG, seed=2)
    lengths = [11, 4, 7, 1]
    input_ids, mask = left_padded_batch(CONFIG.vocab_size, lengths, seed=2)
    batched = generate(model, input_ids, mask, max_new_tokens=12)
    for row, n in enumerate(lengths):
        alone = generate(model, input_ids[row:row + 1, -n:], max_new_tokens=12)
        assert torch.equal(batched[row], alone[0]), f"row {row} differs"


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_greedy_tokens_identical_to_transformers_generate(name, tmp_path):
    config = PARITY_CONFIGS[name]
    write_checkpoint(config, tmp_path, seed=3)
    ours, hf = from_pretrained(tmp_path), hf_reference(tmp_path)
    input_ids, mask = left_padded_batch(config.vocab_size, [10, 6, 8], seed=3)
    tokens = generate(ours, input_ids, mask, max_new_tokens=15)
    with torch.no_grad():
        reference = hf.generate(input_ids, attention_mask=mask, max_new_tokens=15, do_sample=False,
                                pad_token_id=0, eos_token_id=None)[:, input_ids.shape[1]:]
    assert torch.equal(tokens, reference)


def test_stop_tokens_end_rows_and_pad_the_rest():
    model = random_model(CONFIG, seed=4)
    input_ids, mask = left_padded_batch(CONFIG.vocab_size, [5, 5], seed=4)
    free = generate(model, input_ids, mask, max_new_tokens=10)
    stop = int(free[0, 2])  # the token row 0 emits at step 2 becomes a stop token
    stopped = generate(model, input_ids, mask, max_new_tokens=10, stop_token_ids=[stop], pad_token_id=99)
    first = int((free[0] == stop).nonzero()[0])
    assert torch.equal(stopped[0, :first + 1], free[0, :first + 1])
    assert (stopped[0, first + 1:] == 99).all()
    for row in range(2):  # each row either ran to the end or stopped at its first stop token
        hits = (free[row] == stop).nonzero()
        end = int(hits[0]) + 1 if len(hits) else stopped.shape[1]
        assert torch.equal(stopped[row, :end], free[row, :end])


def test_generation_ends_early_when_every_row_stopped():
    model = random_model(CONFIG, seed=5)
    input_ids = torch.randint(0, CONFIG.vocab_size, (1, 4), generator=torch.Generator().manual_seed(5))
    first = int(generate(model, input_ids, max_new_tokens=1)[0, 0])
    assert generate(model, input_ids, max_new_tokens=10, stop_token_ids=[first]).shape == (1, 1)


def test_n_new_tokens_take_n_minus_1_decode_forwards():
    # The prefill's logits give token 1; each of tokens 2..n needs one decode forward over the token before it, and
    # the n-th token is never fed: 2 rows, 4 new tokens -> 3 forwards of 2 tokens (issue 26: a row that counts itself
    # finished only past max_new_tokens feeds its last token in a 4th forward).
    model = random_model(CONFIG, seed=5)
    input_ids = torch.randint(0, CONFIG.vocab_size, (2, 4), generator=torch.Generator().manual_seed(5))
    stats = DecodeStats()
    assert generate(model, input_ids, max_new_tokens=4, stats=stats).shape == (2, 4)
    assert (stats.forwards, stats.fed_tokens) == (3, 6)


def test_allowed_tokens_hook_restricts_every_step():
    model = random_model(CONFIG, seed=6)
    input_ids, mask = left_padded_batch(CONFIG.vocab_size, [6, 3], seed=6)
    allowed_set = torch.tensor([3, 17, 40])
    seen_steps = []

    def only_three(step, generated):
        assert generated.shape == (2, step)
        seen_steps.append(step)
        allowed = torch.zeros(2, CONFIG.vocab_size, dtype=torch.bool)
        allowed[:, allowed_set] = True
        return allowed

    for kwargs in ({}, {"temperature": 1.5, "generator": torch.Generator().manual_seed(0)}):
        seen_steps.clear()
        tokens = generate(model, input_ids, mask, max_new_tokens=9, allowed_tokens=only_three, **kwargs)
        assert torch.isin(tokens, allowed_set).all()
        assert seen_steps == list(range(9))


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = random_model(CONFIG, seed=7)
    input_ids, mask = left_padded_batch(CONFIG.vocab_size, [6, 6, 2], seed=7)

    def draw(seed):
        return generate(model, input_ids, mask, max_new_tokens=12, temperature=1.0, top_p=0.9,
                        generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(11), draw(11))
    assert not torch.equal(draw(11), draw(12))


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(8))
    greedy = logits.argmax(-1)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1, generator=gen), greedy)
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=1e-6, generator=gen), greedy)


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps {0, 1} (0.5 < 0.7, 0.5 + 0.3 >= 0.7)
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)
    draws = sample_next(logits, temperature=1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4)
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0].item() / 4000 - 0.5 / 0.8) < 0.03  # renormalised over the kept set


def test_top_k_draws_only_from_the_k_best():
    logits = torch.randn(1000, 30, generator=torch.Generator().manual_seed(9))
    draws = sample_next(logits, temperature=2.0, top_k=3, generator=torch.Generator().manual_seed(1))
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == draws[:, None]).any(-1).all()


def test_candidate_ids_give_the_same_tokens_as_masking_the_full_vocabulary():
    model = random_model(CONFIG, seed=10)
    input_ids, mask = left_padded_batch(CONFIG.vocab_size, [9, 4, 6], seed=10)
    candidates = [2, 5, 7, 11, 13, 40, 77, 100]

    def grammar(step, generated):  # alternate between two halves of the candidates
        allowed = torch.zeros(3, CONFIG.vocab_size, dtype=torch.bool)
        allowed[:, candidates[:4] if step % 2 else candidates[4:]] = True
        return allowed

    full = generate(model, input_ids, mask, max_new_tokens=10, allowed_tokens=grammar, stop_token_ids=[13])
    sliced = generate(model, input_ids, mask, max_new_tokens=10, allowed_tokens=grammar, stop_token_ids=[13],
                      candidate_ids=candidates)
    assert torch.equal(full, sliced)
    no_hook = generate(model, input_ids, mask, max_new_tokens=10, candidate_ids=candidates)
    assert torch.isin(no_hook, torch.tensor(candidates)).all()
    with pytest.raises(ValueError, match=r"stop token\(s\) \[3\] are not among candidate_ids"):
        generate(model, input_ids, mask, max_new_tokens=2, stop_token_ids=[3], candidate_ids=candidates)


def test_num_samples_share_one_prefill_and_equal_repeating_each_prompt():
    model = random_model(CONFIG, seed=12)
    input_ids, mask = left_padded_batch(CONFIG.vocab_size, [9, 3, 6], seed=12)
    repeated_ids, repeated_mask = input_ids.repeat_interleave(4, dim=0), mask.repeat_interleave(4, dim=0)

    def draw(ids, attention_mask, **kw):
        return generate(model, ids, attention_mask, max_new_tokens=10, temperature=1.0,
                        generator=torch.Generator().manual_seed(3), **kw)

    shared = draw(input_ids, mask, num_samples=4)
    assert shared.shape == (12, 10)
    assert torch.equal(shared, draw(repeated_ids, repeated_mask))  # same rows, same draws, same tokens
    assert len({tuple(row) for row in shared[:4].tolist()}) > 1  # the samples of one prompt really differ
    greedy = generate(model, input_ids, mask, max_new_tokens=10, num_samples=2)
    assert torch.equal(greedy, generate(model, input_ids, mask, max_new_tokens=10).repeat_interleave(2, dim=0))


def test_kv_cache_repeat_interleave_copies_rows_in_order():
    model = random_model(CONFIG, seed=13)
    input_ids, mask = left_padded_batch(CONFIG.vocab_size, [5, 2], seed=13)
    cache = model.new_cache(2, 8)
    with torch.no_grad():
        model(input_ids, mask, kv_cache=cache)
    copy = cache.repeat_interleave(3, max_len=12)
    assert copy.length == 5 and copy.max_len == 12 and copy.k[0].shape[2] == 12
    for row in range(6):
        for layer in range(CONFIG.num_hidden_layers):
            assert torch.equal(copy.k[layer][row, :, :8], cache.k[layer][row // 3])
            assert torch.equal(copy.v[layer][row, :, :8], cache.v[layer][row // 3])
        assert torch.equal(copy.slot_mask[row, :8], cache.slot_mask[row // 3])
    assert not copy.slot_mask[:, 5:].any()
    copy.k[0].zero_()
    assert cache.k[0].abs().sum() > 0  # a copy, not a view: samples write their own slots
    with pytest.raises(ValueError, match="holding 5 positions"):
        cache.repeat_interleave(2, max_len=4)


# ---- sampling by inverse transform, jump-forward and compiled decoding ----------------------------------------------

def test_inverse_transform_draws_each_token_with_its_probability():
    # An even grid of uniforms hits each token exactly in proportion to its probability (cdf 0.5, 0.8, 0.8, 1.0).
    probs = torch.tensor([0.5, 0.3, 0.0, 0.2]).expand(1000, 4)
    uniform = (torch.arange(1000) + 0.5) / 1000
    assert torch.bincount(inverse_transform(probs, uniform), minlength=4).tolist() == [500, 300, 0, 200]
    # Unnormalised rows, and u next to 1 never lands on a token of probability 0.
    edge = inverse_transform(torch.tensor([[0.6, 1.4, 0.0]]), torch.tensor([1 - 2 ** -24]))
    assert edge.tolist() == [1]


def grammar_generation(model, tokenizer, prompts, samples=3, horizon=5, **kwargs):
    from forecasting.grammar import NumberGrammar

    input_ids, mask = tokenizer.encode_batch(prompts)
    grammar = NumberGrammar(tokenizer, model.config.vocab_size, len(prompts) * samples, n_vars=2, horizon=horizon)
    stats = DecodeStats()
    tokens = generate(model, input_ids, mask, max_new_tokens=grammar.max_new_tokens(), num_samples=samples,
                      stop_token_ids=[grammar.stop_id], allowed_tokens=grammar, candidate_ids=grammar.candidate_ids,
                      stats=stats, **kwargs)
    return tokens, stats


PROMPTS = ["0.52,1.10;0.61,0.98;", "1.20,0.33;", "13.1,0.2;0.4,2.25;"]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "top_p": 0.95}])
def test_jump_forward_writes_the_tokens_of_plain_decoding_in_fewer_forwards(sampling):
    """The grammar's forced tokens (separator after the last decimal, point after a leading zero or the last integer
    digit, stop after the horizon) are appended without a draw and fed with the next step; the tokens of every row,
    sampled (seeded) as well as greedy, are those of plain decoding."""
    model, tokenizer = random_model(TINY, seed=21), char_tokenizer()
    seeded = lambda: {"generator": torch.Generator().manual_seed(5)} if sampling else {}
    plain, plain_stats = grammar_generation(model, tokenizer, PROMPTS, **sampling, **seeded())
    jumped, jump_stats = grammar_generation(model, tokenizer, PROMPTS, jump_forward=True, **sampling, **seeded())
    assert torch.equal(jumped, plain)
    assert plain_stats.forced_tokens == 0 and jump_stats.forced_tokens > 0.2 * (plain != 1).sum()
    assert jump_stats.forwards <= plain_stats.forwards - jump_stats.forced_tokens // len(plain) // 2
    assert jump_stats.fed_tokens == plain_stats.fed_tokens  # every token is fed once either way


def test_a_padded_decode_chunk_computes_the_same_logits_packed_as_in_the_grid():
    """Through an eager cache the layers compute only the real tokens of a chunk with padding (packed); a static
    cache computes the whole (B, T) grid. Same logits after each row's last real token, same cache bookkeeping."""
    from qwen_mini.generate import decode_step

    model = random_model(CONFIG, seed=14)
    input_ids, mask = left_padded_batch(CONFIG.vocab_size, [7, 3, 5, 6], seed=14)
    gen = torch.Generator().manual_seed(14)
    with torch.inference_mode():
        eager = model.new_cache(4, 30)
        model(input_ids, mask, kv_cache=eager)
        grid = eager.repeat_interleave(1, static=True)
        for _ in range(4):
            tokens = torch.randint(0, CONFIG.vocab_size, (4, 2), generator=gen)
            real = torch.stack([torch.rand(4, generator=gen) < 0.8, torch.rand(4, generator=gen) < 0.5], dim=1)
            real[:, 1] &= real[:, 0]  # padding only at the end of a row
            packed = decode_step(model, eager, tokens, real, model.lm_head.weight)
            assert eager.packed is None  # only during the call
            full = decode_step(model, grid, tokens, real, model.lm_head.weight)
            has = real.any(1)
            torch.testing.assert_close(packed[has], full[has], atol=1e-5, rtol=0)
    assert torch.equal(eager.lengths, grid.lengths) and torch.equal(eager.positions, grid.positions)


def test_jump_forward_needs_a_constraint_with_read():
    model = random_model(CONFIG)
    with pytest.raises(ValueError, match="jump_forward needs a TokenConstraint"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2, jump_forward=True,
                 allowed_tokens=lambda step, generated: None)


def test_compiled_decoding_matches_eager_and_compiles_once():
    """torch.compile'd decode step over a static cache (one graph: tokens per row fixed, rows and cache length
    symbolic): float32 logits within 1e-5 of the eager step, the same tokens from generate, and no recompilation
    for a call with other rows and prompt lengths. One layer keeps the compilation to seconds."""
    from forecasting.grammar import NumberGrammar
    from qwen_mini.generate import compiled_decode_step, compiled_graphs, decode_step

    config = QwenConfig(**{**PRESETS["tiny"], "num_hidden_layers": 1}, name="tiny-1-layer")
    model, tokenizer = random_model(config, seed=22), char_tokenizer()
    input_ids, mask = tokenizer.encode_batch(PROMPTS)
    with torch.inference_mode():  # as generate runs it (the graph is specialised to inference tensors)
        prompt_cache = model.new_cache(3, input_ids.shape[1])
        model(input_ids, mask, kv_cache=prompt_cache)
        eager, compiled = (prompt_cache.share(2, suffix_len=12, static=True) for _ in range(2))  # as generate does
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        candidates = NumberGrammar(tokenizer, config.vocab_size, 1, n_vars=2, horizon=1).candidate_ids
        head = model.lm_head.weight[torch.tensor(candidates)]  # the grammar's rows, as generate scores them
        for _ in range(5):
            tokens = torch.randint(2, config.vocab_size, (6, 2), generator=gen)
            real = torch.stack([torch.ones(6, dtype=torch.bool), torch.rand(6, generator=gen) < 0.5], dim=1)
            expected = decode_step(model, eager, tokens, real, head)
            torch.testing.assert_close(compiled_decode_step(model, compiled, tokens, real, head), expected,
                                       atol=1e-5, rtol=0)
    assert torch.equal(eager.lengths, compiled.lengths) and torch.equal(eager.slot_mask, compiled.slot_mask)
    graphs = compiled_graphs()  # compiled for 6 rows and a cache of input_ids.shape[1] + 12 slots

    plain, _ = grammar_generation(model, tokenizer, PROMPTS, samples=2)
    fast, _ = grammar_generation(model, tokenizer, PROMPTS, samples=2, compile=True, jump_forward=True)
    assert torch.equal(fast, plain)
    other = ["7.25,0.5;", "0.1,0.2;0.3,0.4;0.5,0.6;"]
    plain, _ = grammar_generation(model, tokenizer, other, samples=4, temperature=0.9,
                                  generator=torch.Generator().manual_seed(1))
    fast, _ = grammar_generation(model, tokenizer, other, samples=4, temperature=0.9, compile=True,
                                 jump_forward=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fast, plain)
    assert compiled_graphs() == graphs, "compiled decoding recompiled for another cache length or number of rows"


def test_temperature_divides_the_logits_before_the_draw():
    """Logits (0, ln 3): probabilities 1/4, 3/4 at temperature 1; at temperature T they are those of (0, ln 3 / T):
    1/10, 9/10 at T = 0.5 and 1/(1 + sqrt 3) ~ 0.366 for token 0 at T = 2. The draw is token 0 when u < p(token 0)."""
    logits = torch.tensor([[0.0, math.log(3.0)]]).repeat(2, 1)
    uniform = torch.tensor([0.2, 0.05])
    assert sample_next(logits, temperature=1.0, uniform=uniform).tolist() == [0, 0]  # u < 1/4
    assert sample_next(logits, temperature=0.5, uniform=uniform).tolist() == [1, 0]  # 0.2 >= 1/10 > 0.05
    uniform = torch.tensor([0.3, 0.4])
    assert sample_next(logits, temperature=1.0, uniform=uniform).tolist() == [1, 1]  # u >= 1/4
    assert sample_next(logits, temperature=2.0, uniform=uniform).tolist() == [0, 1]  # 0.3 < 0.366 <= 0.4


def test_inverse_transform_at_a_cdf_boundary_takes_the_next_drawable_token():
    # cdf(i - 1) <= u * total < cdf(i): u on a boundary belongs to the token after it, never to a token of
    # probability 0 (u = 0 with a first token of probability 0; u = 0.5 where the cdf stays at 0.5 over token 1).
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    assert inverse_transform(probs, torch.tensor([0.0, 0.5])).tolist() == [1, 2]
