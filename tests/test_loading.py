"""Checkpoint loading: formats (single file, sharded, hub id), strictness, and the documented error messages."""
import json

import pytest
import torch
from conftest import PARITY_CONFIGS, QWEN_TOKENIZER_DIR, write_checkpoint
from safetensors.torch import load_file, save_file

from qwen_mini import CheckpointError, CheckpointNotFound, ConfigError, QwenConfig, from_pretrained, save_pretrained

CONFIG = PARITY_CONFIGS["untied"]


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_round_trip_keeps_every_tensor_and_the_config(tmp_path):
    model = write_checkpoint(CONFIG, tmp_path)
    loaded = from_pretrained(tmp_path)
    assert loaded.config == CONFIG
    assert_same_weights(model, loaded)


def test_tied_checkpoint_stores_lm_head_once_and_stays_tied(tmp_path):
    write_checkpoint(PARITY_CONFIGS["gqa7to1_tied"], tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    model = from_pretrained(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_sharded_checkpoint_loads(tmp_path):
    model = write_checkpoint(CONFIG, tmp_path / "single")
    tensors = load_file(tmp_path / "single" / "model.safetensors")
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    (shard_dir / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for file, names in shards.items():
        save_file({k: tensors[k] for k in names}, str(shard_dir / file))
        weight_map.update({k: file for k in names})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_weights(model, from_pretrained(shard_dir))


def test_dtype_and_device_arguments(tmp_path):
    write_checkpoint(CONFIG, tmp_path)
    model = from_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # rotary angles stay exact
    model.to(torch.float16)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def rewrite_tensors(directory, edit):
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"))


def test_missing_tensor_is_named(tmp_path):
    write_checkpoint(CONFIG, tmp_path)
    rewrite_tensors(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight' "
                                              r"\(expected shape \(160, 64\)\)"):
        from_pretrained(tmp_path)


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    write_checkpoint(CONFIG, tmp_path)
    rewrite_tensors(tmp_path, lambda t: t.update({"model.layers.0.self_attn.k_proj.bias": torch.zeros(5)}))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.bias' has shape \(5,\) in the "
                                              r"file but the model expects \(32,\)"):
        from_pretrained(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    write_checkpoint(CONFIG, tmp_path)
    rewrite_tensors(tmp_path, lambda t: t.update({"model.layers.7.extra": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.7\.extra' with shape \(3,\)"):
        from_pretrained(tmp_path)


def test_truncated_file_is_a_clear_error(tmp_path):
    write_checkpoint(CONFIG, tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated safetensors file"):
        from_pretrained(tmp_path)


def test_garbage_file_is_a_clear_error(tmp_path):
    write_checkpoint(CONFIG, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        from_pretrained(tmp_path)


def test_inconsistent_config_is_rejected(tmp_path):
    write_checkpoint(CONFIG, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_key_value_heads"] = 3  # 4 query heads cannot be split into 3 groups
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="num_attention_heads=4 is not divisible by num_key_value_heads=3"):
        from_pretrained(tmp_path)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG.to_hf()))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        from_pretrained(tmp_path)


def test_unreachable_hub_id_says_how_to_use_a_local_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    with pytest.raises(CheckpointNotFound, match="HF_HUB_OFFLINE is set.*pass the local directory"):
        from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")


def test_path_that_is_not_a_directory_nor_a_hub_id(tmp_path):
    with pytest.raises(CheckpointNotFound, match="neither a local directory nor a hub id"):
        from_pretrained(str(tmp_path / "does" / "not" / "exist"))


def test_real_qwen_config_fields_read_unchanged():
    if not QWEN_TOKENIZER_DIR.is_dir():
        pytest.skip("../shared/fixtures/qwen2.5-tokenizer not present")
    config = QwenConfig.from_hf(QWEN_TOKENIZER_DIR / "config.json")
    assert config == QwenConfig.from_name("qwen2.5-0.5b")


def test_preset_values_are_those_of_qwen2_5_0_5b_instruct():
    c = QwenConfig.from_name("qwen2.5-0.5b")
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.vocab_size, c.tie_word_embeddings, c.rope_theta, c.rms_norm_eps) == \
           (24, 896, 14, 2, 64, 4864, 151936, True, 1e6, 1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("num_key_value_heads", 4, "not divisible"),
    ("head_dim", 7, "must be even"),
    ("hidden_size", 0, "positive integer"),
    ("rms_norm_eps", 0.0, "rms_norm_eps must be > 0"),
])
def test_config_validation_messages(field, value, message):
    kwargs = dict(vocab_size=10, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=8)
    kwargs[field] = value
    with pytest.raises(ConfigError, match=message):
        QwenConfig(**kwargs)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="known presets: lv-tiny, qwen2.5-0.5b, tiny"):
        QwenConfig.from_name("qwen-7b")


def test_unsupported_architecture_features_are_refused():
    base = CONFIG.to_hf()
    for change, message in [({"model_type": "llama"}, "only 'qwen2'"), ({"use_sliding_window": True}, "sliding"),
                            ({"rope_scaling": {"rope_type": "yarn"}, "rope_parameters": None}, "yarn")]:
        with pytest.raises(ConfigError, match=message):
            QwenConfig.from_hf({**base, **change})


def test_save_pretrained_output_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = write_checkpoint(PARITY_CONFIGS["odd_sizes"], tmp_path)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert hf.config.head_dim == 10 and hf.config.num_key_value_heads == 3
    assert torch.equal(hf.model.layers[1].self_attn.q_proj.bias, model.model.layers[1].self_attn.q_proj.bias)
    save_pretrained(from_pretrained(tmp_path), tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_type"] == "qwen2"


def test_load_model_and_tokenizer_tiny_is_seeded_and_checkpoints_round_trip(tmp_path):
    from qwen_mini import load_model_and_tokenizer

    a, tok = load_model_and_tokenizer("tiny", seed=3)
    b, _ = load_model_and_tokenizer("tiny", seed=3)
    c, _ = load_model_and_tokenizer("tiny", seed=4)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight) and not torch.equal(a.lm_head.weight, c.lm_head.weight)
    save_pretrained(a, tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_model_and_tokenizer(tmp_path)
    assert_same_weights(a, again)
    assert tok2.encode("1.5;") == tok.encode("1.5;")


def test_atomic_writes_get_ordinary_file_permissions(tmp_path):
    import os

    from common.fileio import write_json_atomic

    old = os.umask(0o022)
    try:
        path = write_json_atomic(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary file left behind
