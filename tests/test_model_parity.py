"""Logit parity with HF transformers' Qwen2ForCausalLM loaded from the same safetensors files."""
import pytest
import torch

from bench.hf_twin import hf_twin
from conftest import left_padded_batch
from qwen_mini import Qwen, QwenConfig


def masked_max_diff(a, b, mask):
    return ((a - b).abs() * mask[..., None]).max().item()


def test_logits_match_transformers_without_padding(parity_checkpoint):
    ours, hf, config = parity_checkpoint
    input_ids = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(input_ids) - hf(input_ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_logits_match_transformers_with_left_padding(parity_checkpoint):
    ours, hf, config = parity_checkpoint
    input_ids, mask = left_padded_batch(config.vocab_size, [13, 7, 1, 10], seed=2)
    with torch.no_grad():
        diff = masked_max_diff(ours(input_ids, mask), hf(input_ids, attention_mask=mask).logits, mask)
    assert diff <= 1e-4


def test_left_padding_does_not_change_real_tokens_logits(parity_checkpoint):
    """Independent of HF: a padded row's logits equal the same prompt run alone."""
    ours, _, config = parity_checkpoint
    input_ids, mask = left_padded_batch(config.vocab_size, [12, 5], seed=3)
    with torch.no_grad():
        batched = ours(input_ids, mask)
        alone = ours(input_ids[1:, -5:])
    assert (batched[1, -5:] - alone[0]).abs().max().item() <= 1e-5


def test_explicit_position_ids_match_transformers(parity_checkpoint):
    ours, hf, config = parity_checkpoint
    input_ids = torch.randint(0, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
    position_ids = torch.arange(20, 29)[None]
    with torch.no_grad():
        diff = (ours(input_ids, position_ids=position_ids) - hf(input_ids, position_ids=position_ids).logits)
    assert diff.abs().max().item() <= 1e-4


def full_size_pair(dtype=torch.float32, device="cpu"):
    """Our 0.5B model with random weights and HF's, sharing the very same tensors (no 2 GB round trip to disk)."""
    pytest.importorskip("transformers")
    config = QwenConfig.from_name("qwen2.5-0.5b")
    torch.manual_seed(0)
    ours = Qwen(config)
    with torch.no_grad():  # make biases and norms non-trivial, keep the 0.02 init elsewhere
        gen = torch.Generator().manual_seed(0)
        for name, p in ours.named_parameters():
            if name.endswith("bias") or name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    ours = ours.to(device=device, dtype=dtype).eval()
    return ours, hf_twin(ours), config


def test_full_size_config_matches_transformers_fp32():
    ours, hf, config = full_size_pair()
    input_ids = torch.randint(0, config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = (ours(input_ids) - hf(input_ids).logits).abs().max().item()
    assert diff <= 1e-3


@pytest.mark.gpu
def test_full_size_config_matches_transformers_fp32_on_gpu():
    ours, hf, config = full_size_pair(device="cuda")
    input_ids = torch.randint(0, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(6)).cuda()
    with torch.no_grad():
        diff = (ours(input_ids) - hf(input_ids).logits).abs().max().item()
    print(f"full-size fp32 GPU max abs diff: {diff:.3e}")
    assert diff <= 1e-3


@pytest.mark.gpu
def test_bf16_matches_transformers_bf16_on_gpu(tmp_path):
    from conftest import PARITY_CONFIGS, hf_reference, write_checkpoint
    from qwen_mini import from_pretrained

    config = PARITY_CONFIGS["gqa7to1_tied"]
    write_checkpoint(config, tmp_path)
    ours = from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda")
    hf = hf_reference(tmp_path, dtype=torch.bfloat16).cuda()
    input_ids, mask = left_padded_batch(config.vocab_size, [20, 11], seed=7)
    with torch.no_grad():
        a = ours(input_ids.cuda(), mask.cuda()).float()
        b = hf(input_ids.cuda(), attention_mask=mask.cuda()).logits.float()
    diff = masked_max_diff(a, b, mask.cuda())
    print(f"bf16 max abs diff vs transformers bf16: {diff:.3e}")
    # bf16 keeps ~3 significant digits; logits here are O(1), so differences of a few 1e-2 are rounding
    assert diff <= 5e-2
