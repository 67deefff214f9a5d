"""The benchmark's fairness: HF's side of the forecast task (the grammar as a logits processor, samples by
num_return_sequences) asks for the very generation ours does. Greedy, so the tokens themselves must agree (HF
refuses num_return_sequences without sampling, so its greedy is sampling from the top-1 token; its warpers run
after custom processors, so that top-1 is taken among the tokens the grammar allows).
And the FLOPs it reports for a LoRA step are the ones torch's own counter sees that step execute."""
from types import SimpleNamespace

import torch
from conftest import random_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import lora
from bench.hf_twin import hf_twin
from bench.tasks import GrammarProcessor, executed_step_flops
from forecasting.grammar import NumberGrammar, max_forecast_tokens
from qwen_mini import PRESETS, QwenConfig, char_tokenizer, generate
from qwen_mini.flops import count_forward
from qwen_mini.loss import causal_lm_loss

TINY = QwenConfig(**PRESETS["tiny"], name="tiny")


def test_hf_generate_with_the_grammar_processor_writes_our_tokens():
    model, tokenizer = random_model(TINY, seed=21), char_tokenizer()
    input_ids, mask = tokenizer.encode_batch(["0.52,1.10;0.61,0.98;", "1.20,0.33;"])
    n_prompts, samples, horizon = 2, 3, 4
    max_new = max_forecast_tokens(horizon, n_vars=2)

    def grammar():
        return NumberGrammar(tokenizer, TINY.vocab_size, n_prompts * samples, n_vars=2, horizon=horizon)

    hook = grammar()
    ours = generate(model, input_ids, mask, max_new_tokens=max_new, num_samples=samples,
                    stop_token_ids=[hook.stop_id], allowed_tokens=hook, candidate_ids=hook.candidate_ids)
    hf = hf_twin(model)
    with torch.no_grad():
        theirs = hf.generate(input_ids, attention_mask=mask, do_sample=True, top_k=1,
                             num_return_sequences=samples, max_new_tokens=max_new, eos_token_id=hook.stop_id,
                             pad_token_id=hook.stop_id,
                             logits_processor=[GrammarProcessor(grammar(), input_ids.shape[1])])[:, input_ids.shape[1]:]
    assert ours.shape[0] == theirs.shape[0] == n_prompts * samples
    width = max(ours.shape[1], theirs.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=hook.stop_id)
    assert torch.equal(pad(ours), pad(theirs))
    texts = [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in ours]
    assert all(text.count(";") == horizon for text in texts), texts


def test_executed_lora_step_flops_match_torch_flop_counter():
    """Forward + backward of a LoRA step under FlopCounterMode (math attention, so both attention products are
    counted): frozen weights get input gradients only, adapters weight gradients too. Torch counts 2*m*n*p per
    product, our rows m*p*(2n-1): within 3 % at these sizes. Counting weight gradients of the frozen weights
    (the 3 x forward convention) would be ~50 % off."""
    config = QwenConfig(**dict(PRESETS["tiny"], hidden_size=256, intermediate_size=512, num_attention_heads=4,
                               head_dim=64), name="wide")
    model = random_model(config)
    lora.inject(model, rank=8, alpha=8, targets=("q_proj", "v_proj"))
    model.train()
    batch, seq = 2, 48
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        causal_lm_loss(model, ids, ids).backward()
    products = [r for r in count_forward(model, batch, seq, training=True).rows
                if r.component.endswith(".matmul") or r.component in ("self_attn.scores", "self_attn.values")]
    ours = executed_step_flops(SimpleNamespace(rows=products))
    assert abs(ours / counter.get_total_flops() - 1) < 0.03, (ours, counter.get_total_flops())
