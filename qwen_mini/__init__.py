"""qwen_mini: Qwen2.5 in plain PyTorch."""
from .config import PRESETS, ConfigError, QwenConfig
from .generate import generate, sample_next
from .hub import CheckpointNotFound
from .loading import CheckpointError, from_pretrained, load_model_and_tokenizer, save_pretrained
from .model import KVCache, Qwen
from .tokenizer import Tokenizer, char_tokenizer

__all__ = ["PRESETS", "CheckpointError", "CheckpointNotFound", "ConfigError", "KVCache", "Qwen", "QwenConfig",
           "Tokenizer", "char_tokenizer", "from_pretrained", "generate", "load_model_and_tokenizer", "sample_next",
           "save_pretrained"]
