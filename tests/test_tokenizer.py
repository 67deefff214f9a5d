"""Tokenizer wrapper: the real Qwen2.5 tokenizer (fixture) and the tiny model's character tokenizer."""
import pytest
import torch

from qwen_mini import QwenConfig, Tokenizer, char_tokenizer


def test_llmtime_text_is_one_token_per_character(qwen_tokenizer):
    text = "0.25,1.03;0.31,0.98"
    ids = qwen_tokenizer.encode(text)
    # ids from the fixture README: digits 0-9 are 15-24, '.' 13, ',' 11, ';' 26
    table = {**{str(d): 15 + d for d in range(10)}, ".": 13, ",": 11, ";": 26}
    assert ids == [table[c] for c in text]
    assert qwen_tokenizer.decode(ids) == text


def test_special_tokens_from_tokenizer_config(qwen_tokenizer):
    assert qwen_tokenizer.eos_id == 151645  # <|im_end|>
    assert qwen_tokenizer.pad_id == 151643  # <|endoftext|>
    assert qwen_tokenizer.vocab_size == 151665


def test_batch_encode_left_pads_with_mask(qwen_tokenizer):
    input_ids, mask = qwen_tokenizer.encode_batch(["1.5;2", "0.25,1.03;"])
    assert input_ids.shape == mask.shape == (2, 10)
    assert mask[0].tolist() == [0] * 5 + [1] * 5 and mask[1].all()
    assert (input_ids[0, :5] == 151643).all()
    assert qwen_tokenizer.decode(input_ids[0, 5:]) == "1.5;2"


def test_char_tokenizer_round_trips_and_fits_the_tiny_vocab(tmp_path):
    tok = char_tokenizer()
    text = "-0.25,1.03;0.31,0.98\n 7"
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert max(ids) < QwenConfig.from_name("tiny").vocab_size
    assert tok.vocab_size <= QwenConfig.from_name("tiny").vocab_size
    tok.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.encode(text) == ids and (again.eos_id, again.pad_id) == (tok.eos_id, tok.pad_id)


def test_decode_accepts_tensors_and_skips_specials():
    tok = char_tokenizer()
    ids = torch.tensor([tok.pad_id, *tok.encode("1.2"), tok.eos_id])
    assert tok.decode(ids, skip_special_tokens=True) == "1.2"


def test_missing_tokenizer_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
