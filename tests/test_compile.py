"""train.py --compile: torch.compile'd decoder blocks give the eager loss and gradients (compiled decoding is tested in
test_generate.py). The reference is the same model run eagerly; compilation costs seconds to tens of seconds on CPU,
so the model is the tiny preset with one layer (every block runs the same compiled code)."""
import copy

import torch
from conftest import random_model

import lora
from qwen_mini import PRESETS, QwenConfig
from qwen_mini.loss import causal_lm_loss
from training.setup import compile_blocks

TINY = QwenConfig(**{**PRESETS["tiny"], "num_hidden_layers": 1}, name="tiny-1-layer")


def lora_step(model, input_ids):
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, input_ids, input_ids)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def test_compiled_blocks_give_the_eager_loss_and_gradients():
    eager = random_model(TINY, seed=3)
    lora.inject(eager, rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    with torch.no_grad():
        for name, p in eager.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))  # a non-zero update
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled) == TINY.num_hidden_layers
    eager.train(), compiled.train()
    for seed in range(2):  # the second step runs the graphs compiled by the first
        input_ids = torch.randint(2, TINY.vocab_size, (2, 48), generator=torch.Generator().manual_seed(seed))
        loss, grads = lora_step(eager, input_ids)
        compiled_loss, compiled_grads = lora_step(compiled, input_ids)
        torch.testing.assert_close(compiled_loss, loss, atol=1e-5, rtol=0)
        assert compiled_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
