"""Model configuration: one dataclass, read from / written to Hugging Face `config.json`, and the config behind a
`--model` spec (`config_for_model`)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .hub import resolve_dir


class ConfigError(ValueError):
    """A config that cannot describe a working Qwen2 model."""


@dataclass
class QwenConfig:
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads, as in HF Qwen2
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = None
    torch_dtype: str = field(default="bfloat16", compare=False)  # storage dtype, not architecture
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        self.validate()

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config {self.name!r}: {key} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config {self.name!r}: num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention needs whole groups)")
        if self.head_dim % 2:
            raise ConfigError(f"config {self.name!r}: head_dim={self.head_dim} must be even for rotary embeddings")
        if not self.rope_theta > 0:
            raise ConfigError(f"config {self.name!r}: rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"config {self.name!r}: rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")

    def check_positions(self, length: int, flag: str = "--ctx", model: str | None = None) -> None:
        """Refuse (ConfigError) sequences of `length` tokens: more than the positions the model was made for."""
        if length > self.max_position_embeddings:
            raise ConfigError(f"{flag} {length} is more than the {self.max_position_embeddings} positions "
                              f"{model or self.name} supports (max_position_embeddings in its config.json)")

    @property
    def n_rep(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]

    # ---- presets -------------------------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str) -> QwenConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name], name=name)

    # ---- Hugging Face config.json ----------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path_or_dict: str | Path | dict) -> QwenConfig:
        """Read an HF Qwen2 `config.json` (a file, a directory holding one, or the parsed dict)."""
        if isinstance(path_or_dict, dict):
            raw, where = dict(path_or_dict), "config dict"
        else:
            path = Path(path_or_dict)
            if path.is_dir():
                path = path / "config.json"
            where = str(path)
            try:
                raw = json.loads(path.read_text())
            except FileNotFoundError:
                raise ConfigError(f"{where}: no such file") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not valid JSON ({e})") from None
        model_type = raw.get("model_type", "qwen2")
        if model_type != "qwen2":
            raise ConfigError(f"{where}: model_type is {model_type!r}; only 'qwen2' (Qwen2 / Qwen2.5) is supported")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{where}: hidden_act {raw['hidden_act']!r} is not supported (Qwen2 uses 'silu')")
        if raw.get("use_sliding_window", False):
            raise ConfigError(f"{where}: use_sliding_window=true is not supported")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{where}: rope scaling type {rope_type!r} is not supported (only plain RoPE)")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in raw]
        if missing:
            raise ConfigError(f"{where}: missing required field(s) {', '.join(missing)}")
        kwargs = {f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw and f.name != "name"}
        kwargs.setdefault("num_key_value_heads", raw["num_attention_heads"])
        kwargs["rope_theta"] = float(raw.get("rope_theta", rope.get("rope_theta", 10000.0)))
        kwargs.setdefault("max_position_embeddings", 32768)
        kwargs.setdefault("rms_norm_eps", 1e-6)
        kwargs.setdefault("tie_word_embeddings", False)  # HF's default for Qwen2Config
        name = raw.get("_name_or_path") or where
        try:
            return cls(**kwargs, name=str(name))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf(self) -> dict:
        """The `config.json` dict that HF transformers' Qwen2ForCausalLM reads."""
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rope_scaling": None,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "use_sliding_window": False,
            "sliding_window": None,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "torch_dtype": self.torch_dtype,
        }


PRESETS: dict[str, dict] = {
    # Exactly Qwen/Qwen2.5-0.5B(-Instruct)'s config.json.
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, head_dim=64, rope_theta=1_000_000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=32768,
                         bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16"),
    # A few layers and the character vocabulary of `qwen_mini.tokenizer.char_tokenizer` (ids < 32), with Qwen's
    # 7:1 query:kv head ratio: fast enough for the test suite and the offline CPU demo.
    "tiny": dict(vocab_size=32, hidden_size=112, intermediate_size=256, num_hidden_layers=3,
                 num_attention_heads=7, num_key_value_heads=1, head_dim=16, rope_theta=1_000_000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=4096,
                 bos_token_id=None, eos_token_id=1, pad_token_id=0, torch_dtype="float32"),
    # The character vocabulary again, sized to be pretrained on CPU on simulated LV series (models/recipe.py makes
    # models/lv-tiny from it): four layers, 4:1 query:kv heads, positions for a whole 100-step trajectory's text
    # (~1000 tokens) and more.
    "lv-tiny": dict(vocab_size=32, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=32, rope_theta=10_000.0,
                    rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=2048,
                    bos_token_id=None, eos_token_id=1, pad_token_id=0, torch_dtype="float32"),
}

# The tiny preset's random weights are drawn with this seed whatever a run's --seed is: runs with different seeds
# adapt the same base model, a run can rebuild it, and `forecast.py --model tiny` is the model every tiny run starts
# from.
TINY_MODEL_SEED = 0

# Hub ids whose config.json is exactly a preset's: their architecture is known offline, without fetching anything.
HUB_PRESETS = {"Qwen/Qwen2.5-0.5B": "qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B-Instruct": "qwen2.5-0.5b"}


def config_for_model(spec: str | Path) -> QwenConfig:
    """The architecture behind a model spec (`--model`), read without loading any weights: a preset name; a hub id
    of HUB_PRESETS (offline, unless a local directory has that name); a local directory's config.json; any other hub
    id's config.json (fetched alone, see `hub.resolve_dir`)."""
    spec = str(spec)
    if spec in PRESETS:
        return QwenConfig.from_name(spec)
    if spec in HUB_PRESETS and not Path(spec).is_dir():
        return QwenConfig.from_name(HUB_PRESETS[spec])
    return QwenConfig.from_hf(resolve_dir(spec, ["config.json"]) / "config.json")
