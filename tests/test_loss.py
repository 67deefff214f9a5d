"""The chunked loss equals plain cross-entropy over full logits, in value and in gradient."""
import pytest
import torch
import torch.nn.functional as F
from conftest import PARITY_CONFIGS, random_model

from qwen_mini.loss import causal_lm_loss


def reference_loss(model, input_ids, labels):
    logits = model(input_ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("name, freeze_head", [("untied", False), ("gqa7to1_tied", False), ("untied", True)])
def test_chunked_loss_and_gradients_equal_full_logits_loss(name, freeze_head):
    config = PARITY_CONFIGS[name]
    input_ids = torch.randint(0, config.vocab_size, (3, 21), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[0, 15:] = -100  # padded tail
    labels[2, :3] = -100
    model_a, model_b = random_model(config, seed=1), random_model(config, seed=1)
    for model in (model_a, model_b):  # a frozen LM head is the LoRA case: only hidden states need gradients
        model.lm_head.weight.requires_grad_(not freeze_head)
    ours = causal_lm_loss(model_a, input_ids, labels, chunk_size=7)  # 60 positions: chunks of 7, last one short
    ref = reference_loss(model_b, input_ids, labels)
    assert abs(ours.item() - ref.item()) <= 1e-5
    ours.backward()
    ref.backward()
    for (param_name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        if b.grad is None:
            assert a.grad is None, param_name
        else:
            assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4), param_name


def test_loss_without_grad_and_all_ignored_labels():
    model = random_model(PARITY_CONFIGS["gqa7to1_tied"])
    input_ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert abs(causal_lm_loss(model, input_ids, input_ids).item()
                   - reference_loss(model, input_ids, input_ids).item()) <= 1e-5
        assert causal_lm_loss(model, input_ids, torch.full_like(input_ids, -100)).item() == 0.0
        total = causal_lm_loss(model, input_ids, input_ids, reduction="sum").item()
        assert abs(total / (2 * 8) - reference_loss(model, input_ids, input_ids).item()) <= 1e-5
