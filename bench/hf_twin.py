"""HF transformers' Qwen2ForCausalLM holding the very tensors of one of our models (benchmarks and parity tests;
the product never imports transformers)."""
from __future__ import annotations

import torch

from qwen_mini import Qwen


def hf_twin(ours: Qwen, attn_implementation: str = "sdpa"):
    """Built on the meta device and given our parameters by assignment: no copy, no second init, same device/dtype."""
    import transformers

    device = ours.lm_head.weight.device
    hf_config = transformers.Qwen2Config(**ours.config.to_hf())
    hf_config._attn_implementation = attn_implementation
    with torch.device("meta"):
        hf = transformers.Qwen2ForCausalLM(hf_config)
    hf.load_state_dict(ours.state_dict(), assign=True)
    hf.tie_weights()
    with torch.device(device):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_config)  # its buffers are not in the state dict
    return hf.to(device=device, dtype=ours.lm_head.weight.dtype).eval()
