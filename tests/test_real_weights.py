"""Real Qwen2.5-0.5B-Instruct weights, when a local hub cache has them (never downloaded by tests)."""
import pytest
import torch

HUB_ID = "Qwen/Qwen2.5-0.5B-Instruct"


def cached_snapshot():
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(HUB_ID, allow_patterns=["*.json", "*.safetensors"], local_files_only=True)
    except Exception:
        pytest.skip(f"{HUB_ID} is not in the local hub cache")


@pytest.mark.gpu
def test_real_weights_logits_and_greedy_generation_match_transformers():
    transformers = pytest.importorskip("transformers")
    from qwen_mini import Tokenizer, from_pretrained, generate

    path = cached_snapshot()
    ours = from_pretrained(path, dtype=torch.float32, device="cuda")
    hf = transformers.Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    tok = Tokenizer.from_pretrained(path)
    prompts = ["0.92,0.74;0.56,0.77;0.34,0.70;", "1.20,0.31;1.45,0.29;1.80,0.28;2.10,0.30;"]
    input_ids, mask = tok.encode_batch(prompts)
    input_ids, mask = input_ids.cuda(), mask.cuda()
    with torch.no_grad():
        diff = ((ours(input_ids, mask) - hf(input_ids, attention_mask=mask).logits).abs() * mask[..., None]).max()
    print(f"real-weight fp32 max abs logit diff: {diff.item():.3e}")
    assert diff.item() <= 1e-3
    tokens = generate(ours, input_ids, mask, max_new_tokens=30)
    with torch.no_grad():
        reference = hf.generate(input_ids, attention_mask=mask, max_new_tokens=30, do_sample=False,
                                pad_token_id=tok.pad_id, eos_token_id=None)[:, input_ids.shape[1]:]
    assert torch.equal(tokens, reference)
