"""LoRA parity with the reference implementation: Hugging Face PEFT on transformers' Qwen2ForCausalLM.

The base is a tiny random Qwen saved with `qwen_mini.save_pretrained` and loaded independently by both sides;
adapters move between the two only through tensors copied by name or through files on disk."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import lora
from qwen_mini import Qwen, QwenConfig, from_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
RANK, ALPHA = 4, 8


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None, torch_dtype="float32")
    model = Qwen(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(std=0.5)  # non-zero biases: a dropped bias would show
    return save_pretrained(model, tmp_path_factory.mktemp("lora_base"))


def hf_model(base_dir):
    return transformers.Qwen2ForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()


def peft_model(base_dir, target_modules=TARGETS, dropout=0.0):
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=target_modules, lora_dropout=dropout,
                             task_type="CAUSAL_LM")
    model = peft.get_peft_model(hf_model(base_dir), config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def peft_adapter(model) -> dict[str, torch.Tensor]:
    """PEFT's adapter parameters under our names: base_model.model.X.lora_A.default.weight -> X.lora_A.weight."""
    return {n.removeprefix("base_model.model.").replace(".default.", "."): p
            for n, p in model.named_parameters() if ".lora_" in n}


def batch(seed=2):
    return torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(seed))


def test_logits_and_one_adamw_step_match_peft(base_dir):
    ref = peft_model(base_dir)
    ours = from_pretrained(base_dir)
    n = lora.inject(ours, rank=RANK, alpha=ALPHA, targets=TARGETS)
    assert n == sum(p.numel() for p in ref.parameters() if p.requires_grad)
    ref_adapter = peft_adapter(ref)
    assert sorted(ref_adapter) == sorted(lora.lora_state_dict(ours))
    with torch.no_grad():
        for name, t in lora.lora_state_dict(ours).items():
            t.copy_(ref_adapter[name])
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(input_ids=x).logits, atol=1e-5, rtol=0)

    ours.train(), ref.train()
    opt_ours = torch.optim.AdamW(lora.trainable_parameters(ours), lr=1e-2)
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    logits = ours(x)
    loss_ours = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    loss_ref = ref(input_ids=x, labels=x).loss  # HF shifts the labels itself
    torch.testing.assert_close(loss_ours, loss_ref, atol=1e-5, rtol=0)
    loss_ours.backward()
    loss_ref.backward()
    opt_ours.step()
    opt_ref.step()
    ref_adapter = peft_adapter(ref)
    for name, t in lora.lora_state_dict(ours).items():
        torch.testing.assert_close(t, ref_adapter[name].detach(), atol=1e-5, rtol=0, msg=name)
    assert not torch.allclose(ref_adapter["model.layers.0.self_attn.q_proj.lora_A.weight"],
                              peft_adapter(peft_model(base_dir))["model.layers.0.self_attn.q_proj.lora_A.weight"])
    ours.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(input_ids=x).logits, atol=1e-5, rtol=0)


def test_dropout_in_training_mode_matches_peft(base_dir):
    """Dropout on the adapter's input only, drawn in module order: with the same seed, the same units are dropped as in
    PEFT, so training-mode logits and adapter gradients are identical (dropout elsewhere, e.g. on the update or on the
    base layer's input, would not be)."""
    dropout = 0.3
    ref = peft_model(base_dir, dropout=dropout)
    ours = from_pretrained(base_dir)
    lora.inject(ours, rank=RANK, alpha=ALPHA, targets=TARGETS, dropout=dropout)
    with torch.no_grad():
        for name, t in lora.lora_state_dict(ours).items():
            t.copy_(peft_adapter(ref)[name])
    ours.train(), ref.train()
    x = batch(3)
    torch.manual_seed(11)
    logits = ours(x)
    torch.manual_seed(11)
    ref_logits = ref(input_ids=x).logits
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert (logits - ours.eval()(x)).abs().max() > 1e-2  # dropout really dropped something
    logits.square().mean().backward()
    ref_logits.square().mean().backward()
    ref_adapter = peft_adapter(ref)
    params = dict(ours.named_parameters())
    for name in lora.lora_state_dict(ours):
        torch.testing.assert_close(params[name].grad, ref_adapter[name].grad, atol=1e-5, rtol=0, msg=name)


def test_our_adapter_loads_in_peft(base_dir, tmp_path):
    ours = from_pretrained(base_dir)
    lora.inject(ours, rank=RANK, alpha=ALPHA, targets=TARGETS)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for t in lora.lora_state_dict(ours).values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    lora.save_adapter(ours, tmp_path, base_model_name_or_path=str(base_dir))
    ref = peft.PeftModel.from_pretrained(hf_model(base_dir), tmp_path)
    assert ref.peft_config["default"].r == RANK and ref.peft_config["default"].lora_alpha == ALPHA
    assert set(ref.peft_config["default"].target_modules) == set(TARGETS)
    x = batch(4)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(input_ids=x).logits, atol=1e-5, rtol=0)
    # PEFT actually loaded our tensors (it starts from random A and zero B otherwise).
    ref_adapter = peft_adapter(ref)
    for name, t in lora.lora_state_dict(ours).items():
        assert torch.equal(t, ref_adapter[name]), name


def test_peft_adapter_loads_in_ours_with_same_files_format(base_dir, tmp_path):
    ref = peft_model(base_dir)
    ref.save_pretrained(tmp_path / "peft")
    ours = lora.load_adapter(from_pretrained(base_dir), tmp_path / "peft")
    x = batch(6)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(input_ids=x).logits, atol=1e-5, rtol=0)
    # Saving it again gives PEFT's tensor names, shapes and dtypes exactly.
    lora.save_adapter(ours, tmp_path / "ours")
    files = {}
    for side in ("peft", "ours"):
        with safe_open(str(tmp_path / side / "adapter_model.safetensors"), "pt") as f:
            files[side] = {k: (tuple(f.get_tensor(k).shape), f.get_tensor(k).dtype) for k in f.keys()}
    assert files["ours"] == files["peft"]
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in files["ours"]
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    mine = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias", "fan_in_fan_out"):
        assert mine[key] == theirs[key], key
    assert sorted(mine["target_modules"]) == sorted(theirs["target_modules"])


def test_peft_regex_targets_resolve_like_peft(base_dir, tmp_path):
    # A regex string selects modules by full path (re.fullmatch), so only layer 1's q/v get adapters.
    ref = peft_model(base_dir, target_modules=r".*\.layers\.1\.self_attn\.(q|v)_proj")
    ref.save_pretrained(tmp_path)
    ours = lora.load_adapter(from_pretrained(base_dir), tmp_path)
    assert [n for n, _ in lora.lora_layers(ours)] == ["model.layers.1.self_attn.q_proj",
                                                      "model.layers.1.self_attn.v_proj"]
    x = batch(8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(input_ids=x).logits, atol=1e-5, rtol=0)
