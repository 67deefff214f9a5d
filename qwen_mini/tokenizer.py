"""A thin wrapper over the `tokenizers` library: Qwen's tokenizer.json, or a character vocabulary for tiny models."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models

from .hub import resolve_dir

# The tiny model's vocabulary: three specials, then one token per character LLMTIME text can contain.
CHAR_SPECIALS = ("<|pad|>", "<|eos|>", "<|unk|>")
CHAR_ALPHABET = "0123456789.,;- \n"


class Tokenizer:
    def __init__(self, backend: _HFTokenizer, eos_token: str | None = None, pad_token: str | None = None):
        self.backend = backend
        self.eos_token, self.pad_token = eos_token, pad_token
        self.eos_id = self._id_of(eos_token)
        pad_id = self._id_of(pad_token)
        self.pad_id = pad_id if pad_id is not None else (self.eos_id if self.eos_id is not None else 0)

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike) -> Tokenizer:
        """Read `tokenizer.json` (+ `tokenizer_config.json` for eos/pad tokens) from a directory or hub id."""
        root = resolve_dir(path_or_hub_id, ["tokenizer.json", "tokenizer_config.json", "*.json"])
        file = root / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{root}: no tokenizer.json (qwen_mini reads the fast-tokenizer file)")
        try:
            backend = _HFTokenizer.from_file(str(file))
        except Exception as e:
            raise ValueError(f"{file}: cannot be read as a tokenizers file ({e})") from None
        special = {}
        config_file = root / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
            for key in ("eos_token", "pad_token"):
                value = config.get(key)
                special[key] = value.get("content") if isinstance(value, dict) else value
        return cls(backend, **special)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {"eos_token": self.eos_token, "pad_token": self.pad_token,
                  "tokenizer_class": "PreTrainedTokenizerFast"}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded `input_ids` and `attention_mask` (1 = real token), ready for generation."""
        encoded = [self.encode(t) for t in texts]
        width = max((len(ids) for ids in encoded), default=0)
        input_ids = torch.full((len(texts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(texts), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            if ids:
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attention_mask[row, width - len(ids):] = 1
        return input_ids, attention_mask


def char_tokenizer() -> Tokenizer:
    """One token per character of LLMTIME text; the tokenizer of the `tiny` preset (ids < 32)."""
    vocab = {token: i for i, token in enumerate(CHAR_SPECIALS + tuple(CHAR_ALPHABET))}
    backend = _HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))
    backend.add_special_tokens(list(CHAR_SPECIALS))
    backend.decoder = decoders.Fuse()
    return Tokenizer(backend, eos_token="<|eos|>", pad_token="<|pad|>")
