"""LoRA package: the adapter module, injection, merging, training behaviour and our own adapter files.

Parity with Hugging Face PEFT (the reference) lives in test_lora_peft.py."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lora
from lora import AdapterError, LoRALinear
from qwen_mini import Qwen, QwenConfig, from_pretrained, save_pretrained

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_config(**overrides) -> QwenConfig:
    kwargs = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None, torch_dtype="float32")
    kwargs.update(overrides)
    return QwenConfig(**kwargs)


def tiny_model(seed=0, **overrides) -> Qwen:
    torch.manual_seed(seed)
    model = Qwen(tiny_config(**overrides))
    with torch.no_grad():  # init_weights zeroes biases: give them values so a lost bias would show
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(std=0.5)
    return model.eval()


def randomize_b(model, std=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * std)


def ids(batch=2, length=7, vocab=64, seed=3):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- LoRALinear ---------------------------------------------------------------------------------------------------

def test_lora_linear_attributes_init_and_formula():
    torch.manual_seed(0)
    base = nn.Linear(64, 24, bias=True)
    nn.init.normal_(base.bias)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LoRALinear(base, rank=8, alpha=16, dropout=0.0)
    assert layer.base_layer is base
    assert isinstance(layer.lora_A, nn.Linear) and layer.lora_A.bias is None
    assert isinstance(layer.lora_B, nn.Linear) and layer.lora_B.bias is None
    assert layer.lora_A.weight.shape == (8, 64) and layer.lora_B.weight.shape == (24, 8)
    assert isinstance(layer.scaling, float) and layer.scaling == 2.0
    assert (layer.rank, layer.alpha, layer.merged) == (8, 16, False)
    assert isinstance(layer.lora_dropout, nn.Identity)
    assert isinstance(LoRALinear(nn.Linear(4, 4), 2, dropout=0.1).lora_dropout, nn.Dropout)
    assert LoRALinear(nn.Linear(4, 4), 2).scaling == 1.0  # alpha defaults to rank
    # PEFT's init: B = 0, A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)).
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(64)
    a = layer.lora_A.weight.detach()
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.2 * bound / math.sqrt(3)
    # Output against the formula written out by hand.
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 5, 64)
    expected = x @ w0.T + b0 + 2.0 * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert (layer.in_features, layer.out_features) == (64, 24)


def test_lora_linear_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 4), 0)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(nn.Linear(4, 4), 2, dropout=1.0)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(4, 4, 1), 2)
    with pytest.raises(ValueError, match="already"):
        LoRALinear(LoRALinear(nn.Linear(4, 4), 2), 2)


def test_dropout_applies_to_adapter_input_in_training_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), 4, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(8, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    # The base path never sees dropout: with B = 0 training-mode output is the base output.
    nn.init.zeros_(layer.lora_B.weight)
    torch.testing.assert_close(layer(x), layer.base_layer(x))


# ---- inject / merge / training --------------------------------------------------------------------------------------

def test_fresh_adapter_leaves_logits_unchanged():
    model = tiny_model()
    x = ids()
    with torch.no_grad():
        before = model(x)
        lora.inject(model, rank=4, alpha=8, targets=ALL)
        after = model(x)
    assert len(list(lora.lora_layers(model))) == 7 * 2
    assert torch.equal(before, after)  # B = 0 adds exact zeros


def test_merge_matches_unmerged_and_unmerge_restores_weights():
    model = tiny_model()
    lora.inject(model, rank=4, alpha=8, targets=ALL)
    randomize_b(model, std=0.5)
    base_weights = {n: layer.base_layer.weight.detach().clone() for n, layer in lora.lora_layers(model)}
    x, mask = ids(), torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0  # left padding takes the masked attention path
    with torch.no_grad():
        unmerged = model(x, attention_mask=mask)
        assert lora.merge_all(model) == 14
        assert all(layer.merged for _, layer in lora.lora_layers(model))
        changed = [n for n, layer in lora.lora_layers(model)
                   if not torch.equal(layer.base_layer.weight, base_weights[n])]
        assert len(changed) == 14
        merged = model(x, attention_mask=mask)
        lora.merge_all(model)  # idempotent: merging twice must not add the update twice
        merged_again = model(x, attention_mask=mask)
        base = tiny_model()(x, attention_mask=mask)  # same seed: the model before LoRA
    assert (unmerged - base).abs().max() > 1e-2  # the adapter matters, so the comparison below means something
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged_again, unmerged, atol=1e-5, rtol=0)
    lora.unmerge_all(model)
    for name, layer in lora.lora_layers(model):
        assert not layer.merged
        torch.testing.assert_close(layer.base_layer.weight, base_weights[name], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x, attention_mask=mask), unmerged, atol=1e-5, rtol=0)


def test_merge_and_unload_gives_a_plain_model_that_round_trips(tmp_path):
    model = tiny_model()
    plain_keys = set(model.state_dict())
    lora.inject(model, rank=2, targets=("q_proj", "down_proj"))
    randomize_b(model, std=0.5)
    x = ids()
    with torch.no_grad():
        expected = model(x)
    lora.merge_and_unload(model)
    assert not list(lora.lora_layers(model))
    assert set(model.state_dict()) == plain_keys
    save_pretrained(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(from_pretrained(tmp_path)(x), expected, atol=1e-5, rtol=0)


def test_only_lora_parameters_train():
    model = tiny_model()
    n = lora.inject(model, rank=4, alpha=4, targets=("q_proj", "v_proj", "up_proj"))
    randomize_b(model)  # with B = 0, A's gradient would be exactly zero
    lora_params = {id(p) for _, layer in lora.lora_layers(model)
                   for p in (layer.lora_A.weight, layer.lora_B.weight)}
    assert n == sum(p.numel() for p in lora.trainable_parameters(model))
    assert {id(p) for p in lora.trainable_parameters(model)} == lora_params
    frozen_before = {k: v.detach().clone() for k, v in model.named_parameters() if id(v) not in lora_params}
    adapters_before = {k: v.detach().clone() for k, v in lora.lora_state_dict(model).items()}
    model.train()
    # Every parameter goes to the optimizer: frozen ones must survive even that (AdamW decay included).
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = ids()
    logits = model(x)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        if id(p) in lora_params:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    opt.step()
    for name, p in model.named_parameters():
        if id(p) not in lora_params:
            assert torch.equal(p, frozen_before[name]), name
    after = lora.lora_state_dict(model)
    assert all(not torch.equal(after[k], v) for k, v in adapters_before.items())


def test_lora_state_dict_and_mark_only_lora_trainable():
    model = tiny_model()
    lora.inject(model, rank=3, targets=("k_proj", "o_proj"))
    state = lora.lora_state_dict(model)
    assert sorted(state) == sorted(f"model.layers.{i}.self_attn.{p}.lora_{ab}.weight"
                                   for i in range(2) for p in ("k_proj", "o_proj") for ab in "AB")
    assert state["model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (2 * 8, 3)
    model.requires_grad_(True)
    assert lora.mark_only_lora_trainable(model) == sum(v.numel() for v in state.values())
    assert all(not p.requires_grad for k, p in model.named_parameters() if ".lora_" not in k)


def test_trainable_count_of_real_config_on_meta_device():
    with torch.device("meta"):
        model = Qwen(QwenConfig.from_name("qwen2.5-0.5b"))
    assert lora.inject(model, rank=4) == 270_336
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.lora_A.weight.is_meta
    assert isinstance(model.model.layers[23].self_attn.v_proj, LoRALinear)
    assert not isinstance(model.model.layers[0].self_attn.k_proj, LoRALinear)
    assert sum(p.numel() for p in lora.trainable_parameters(model)) == 270_336
    assert len(lora.lora_state_dict(model)) == 24 * 2 * 2
    lora.merge_all(model)  # shape-only bookkeeping works without data too
    lora.unmerge_all(model)


def test_inject_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown LoRA target.*'qproj'.*valid targets: q_proj, k_proj, v_proj, "
                                         "o_proj, gate_proj, up_proj, down_proj"):
        lora.inject(model, rank=4, targets=("qproj", "v_proj"))
    with pytest.raises(ValueError, match="lm_head"):
        lora.inject(model, rank=4, targets=("lm_head",))
    assert not list(lora.lora_layers(model))  # nothing half-done
    lora.inject(model, rank=4)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj already carries a LoRA adapter"):
        lora.inject(model, rank=4, targets=("q_proj",))
    with pytest.raises(ValueError, match="rank"):
        lora.inject(tiny_model(), rank=0)


# ---- adapter files (our side; PEFT interop in test_lora_peft.py) ----------------------------------------------------

def saved_adapter(tmp_path, rank=4, alpha=8, targets=("q_proj", "v_proj")):
    model = tiny_model()
    lora.inject(model, rank=rank, alpha=alpha, targets=targets)
    randomize_b(model)
    lora.save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny-base")
    return model, tmp_path / "adapter"


def test_save_and_load_round_trip(tmp_path):
    model, path = saved_adapter(tmp_path, rank=4, alpha=8, targets=("q_proj", "v_proj", "gate_proj"))
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.0)
    assert config["target_modules"] == ["q_proj", "v_proj", "gate_proj"]
    assert (config["bias"], config["fan_in_fan_out"], config["base_model_name_or_path"]) == ("none", False,
                                                                                            "tiny-base")
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert keys == sorted(f"base_model.model.model.layers.{i}.{p}.lora_{ab}.weight" for i in range(2)
                          for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj") for ab in "AB")
    fresh = tiny_model()  # same base weights (same seed), no LoRA yet
    assert lora.load_adapter(fresh, path) is fresh
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
    layer = fresh.model.layers[1].mlp.gate_proj
    assert isinstance(layer, LoRALinear) and (layer.rank, layer.alpha, layer.scaling) == (4, 8, 2.0)
    assert {id(p) for p in lora.trainable_parameters(fresh)} == \
        {id(p) for _, layer in lora.lora_layers(fresh) for p in (layer.lora_A.weight, layer.lora_B.weight)}
    # A model that already has matching LoRA layers (resuming training) loads the same weights.
    resumed = tiny_model()
    lora.inject(resumed, rank=4, alpha=8, targets=("gate_proj", "q_proj", "v_proj"))
    lora.load_adapter(resumed, path)
    with torch.no_grad():
        torch.testing.assert_close(resumed(x), model(x), atol=0, rtol=0)


def test_partial_injection_saves_full_module_paths(tmp_path):
    model = tiny_model()
    lora.inject(model, rank=2, targets=("q_proj",))
    lora.merge_and_unload(model)  # drop the adapters again, then adapt one layer by hand
    model.model.layers[1].self_attn.q_proj = LoRALinear(model.model.layers[1].self_attn.q_proj, 2)
    randomize_b(model)
    lora.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    fresh = tiny_model()
    lora.load_adapter(fresh, tmp_path)
    assert [n for n, _ in lora.lora_layers(fresh)] == ["model.layers.1.self_attn.q_proj"]


def test_save_writes_no_temporary_files_and_overwrites(tmp_path):
    model, path = saved_adapter(tmp_path)
    randomize_b(model, seed=7)
    lora.save_adapter(model, path)
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = tiny_model()
    lora.load_adapter(fresh, path)
    assert all(torch.equal(v, lora.lora_state_dict(model)[k]) for k, v in lora.lora_state_dict(fresh).items())


def test_save_without_lora_layers_fails(tmp_path):
    with pytest.raises(AdapterError, match="no LoRA layers"):
        lora.save_adapter(tiny_model(), tmp_path)


def test_load_errors_for_missing_files(tmp_path):
    with pytest.raises(AdapterError, match="no such adapter directory"):
        lora.load_adapter(tiny_model(), tmp_path / "nowhere")
    _, path = saved_adapter(tmp_path)
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: no such file"):
        lora.load_adapter(tiny_model(), path)
    (path / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match=r"adapter_config\.json: no such file"):
        lora.load_adapter(tiny_model(), path)


def test_load_errors_for_bad_config(tmp_path):
    _, path = saved_adapter(tmp_path)
    config_file = path / "adapter_config.json"
    good = json.loads(config_file.read_text())

    def check(change, pattern):
        config_file.write_text(json.dumps({**good, **change}))
        with pytest.raises(AdapterError, match=pattern):
            lora.load_adapter(tiny_model(), path)

    check({"use_dora": True}, "adapter_config.json: use_dora=True is not supported")
    check({"rank_pattern": {"q_proj": 8}}, "rank_pattern")
    check({"bias": "all"}, "bias='all'")
    check({"peft_type": "IA3"}, "only 'LORA'")
    check({"r": None}, "missing required key.*r")
    check({"target_modules": ["lm_head"]}, "'lm_head', which is not one of the adaptable projections")
    check({"target_modules": ["qkv"]}, "target module 'qkv' matches no module")
    config_file.write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json: not valid JSON"):
        lora.load_adapter(tiny_model(), path)


def test_load_errors_for_bad_tensors(tmp_path):
    _, path = saved_adapter(tmp_path)
    weights = path / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        good = {k: f.get_tensor(k) for k in f.keys()}
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def check(tensors, pattern):
        save_file(tensors, str(weights))
        with pytest.raises(AdapterError, match=pattern):
            lora.load_adapter(tiny_model(), path)

    check({k: v for k, v in good.items() if k != key}, rf"missing tensor '{key}' \(expected shape \(16, 4\)\)")
    check({**good, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 32)},
          r"unexpected tensor 'base_model.model.lm_head.lora_A.weight' with shape \(4, 32\)")
    check({**good, key: torch.zeros(16, 2)}, rf"tensor '{key}' has shape \(16, 2\) in the file but the model "
                                            r"expects \(16, 4\)")
    weights.write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        lora.load_adapter(tiny_model(), path)


def test_load_shape_mismatch_with_other_base_and_existing_layers(tmp_path):
    _, path = saved_adapter(tmp_path)  # hidden_size 32
    with pytest.raises(AdapterError, match=r"q_proj.lora_A.weight' has shape \(4, 32\) in the file but the model "
                                           r"expects \(4, 48\)"):
        lora.load_adapter(tiny_model(hidden_size=48, head_dim=12), path)
    other_rank = tiny_model()
    lora.inject(other_rank, rank=2, alpha=8)
    with pytest.raises(AdapterError, match="r=4, lora_alpha=8 but the model's model.layers.0.self_attn.q_proj has "
                                           "rank=2"):
        lora.load_adapter(other_rank, path)
    other_targets = tiny_model()
    lora.inject(other_targets, rank=4, alpha=8, targets=("q_proj",))
    with pytest.raises(AdapterError, match="differ from the adapter's target_modules"):
        lora.load_adapter(other_targets, path)
    merged = tiny_model()
    lora.inject(merged, rank=4, alpha=8)
    lora.merge_all(merged)
    with pytest.raises(AdapterError, match="is merged; unmerge"):
        lora.load_adapter(merged, path)
