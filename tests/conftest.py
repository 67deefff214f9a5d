"""Shared test helpers: random tiny checkpoints, the HF reference, fixture locations, marker handling."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from qwen_mini import Qwen, QwenConfig, save_pretrained

# ../shared/fixtures beside the checkout (real tokenizer + the users' h5). Never needed by the product.
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
QWEN_TOKENIZER_DIR = FIXTURES / "qwen2.5-tokenizer"
LV_H5 = FIXTURES / "lotka_volterra_data.h5"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen2.5 tokenizer from ../shared/fixtures; tests using it skip cleanly where it is absent."""
    from qwen_mini import Tokenizer

    if not (QWEN_TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.skip("../shared/fixtures/qwen2.5-tokenizer not present")
    return Tokenizer.from_pretrained(QWEN_TOKENIZER_DIR)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Give every parameter (biases and norm weights included) random values, so parity tests exercise them all."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_((1.0 + noise) if name.endswith("norm.weight") else noise)
    return model


def random_model(config: QwenConfig, seed: int = 0) -> Qwen:
    torch.manual_seed(seed)
    return randomize_(Qwen(config), seed).eval()


def write_checkpoint(config: QwenConfig, directory: Path, seed: int = 0) -> Qwen:
    model = random_model(config, seed)
    save_pretrained(model, directory)
    return model


def hf_reference(directory: Path, dtype=torch.float32, attn_implementation: str = "eager"):
    transformers = pytest.importorskip("transformers")
    return transformers.Qwen2ForCausalLM.from_pretrained(
        str(directory), dtype=dtype, attn_implementation=attn_implementation).eval()


# Parity configs: Qwen's 7:1 query:kv ratio (tied), an untied one, and odd sizes (head_dim * heads != hidden).
PARITY_CONFIGS = {
    "gqa7to1_tied": QwenConfig(vocab_size=101, hidden_size=56, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=7, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True),
    "untied": QwenConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
                         rope_theta=10_000.0),
    "odd_sizes": QwenConfig(vocab_size=61, hidden_size=36, intermediate_size=77, num_hidden_layers=2,
                            num_attention_heads=6, num_key_value_heads=3, head_dim=10, tie_word_embeddings=False,
                            rope_theta=500_000.0, rms_norm_eps=1e-5),
}


@pytest.fixture(params=sorted(PARITY_CONFIGS))
def parity_checkpoint(request, tmp_path):
    """(our model loaded back from disk, HF reference loaded from the same files, config)."""
    from qwen_mini import from_pretrained

    config = PARITY_CONFIGS[request.param]
    write_checkpoint(config, tmp_path, seed=sorted(PARITY_CONFIGS).index(request.param))
    return from_pretrained(tmp_path), hf_reference(tmp_path), config


def left_padded_batch(vocab_size: int, lengths: list[int], seed: int = 0, pad_id: int = 0):
    """Random prompts of the given lengths, left padded to the longest."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        input_ids[row, width - n:] = torch.randint(0, vocab_size, (n,), generator=gen)
        mask[row, width - n:] = 1
    return input_ids, mask


def tiny_plan(name: str, data, stages: str, gqa: str | None = "mha", **train) -> str:
    """A study plan's text on the tiny model and a small data file: [study], a [train] table of small settings
    (`train` adds or replaces keys; None drops one; no `data`: the command line's), then `stages` (the [forecast]
    table and [[stage]]s) as given."""
    settings = {"model": "tiny", "data": None if data is None else str(data), "batch": 2, "ctx": 32, "val_batches": 1,
                "eval_every": 3,
                "checkpoint_every": 3, "rank": 2, **train}
    lines = ["[study]", f'name = "{name}"'] + ([f'gqa = "{gqa}"'] if gqa else []) + ["", "[train]"]
    for key, value in settings.items():
        if value is not None:
            lines.append(f"{key} = " + (f'"{value}"' if isinstance(value, str) else
                                        "true" if value is True else "false" if value is False else str(value)))
    return "\n".join(lines) + "\n\n" + stages.strip() + "\n"
