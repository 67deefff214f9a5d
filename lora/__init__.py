"""LoRA for qwen_mini: adapters as small modules wrapping the model's linears (`layer`), saved in PEFT's format
(`peft`); `meta` builds the weightless adapted model FLOP counts read."""
from .layer import (
                    VALID_TARGETS,
                    LoRALinear,
                    adapters_to_float32,
                    check_targets,
                    inject,
                    lora_layers,
                    lora_state_dict,
                    mark_only_lora_trainable,
                    merge_all,
                    merge_and_unload,
                    trainable_parameters,
                    unmerge_all,
)
from .meta import lora_model_on_meta
from .peft import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PEFT_PREFIX, AdapterError, load_adapter, save_adapter

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "AdapterError", "LoRALinear", "PEFT_PREFIX",
           "VALID_TARGETS", "adapters_to_float32", "check_targets", "inject", "load_adapter", "lora_layers",
           "lora_model_on_meta", "lora_state_dict", "mark_only_lora_trainable", "merge_all", "merge_and_unload",
           "save_adapter", "trainable_parameters", "unmerge_all"]
