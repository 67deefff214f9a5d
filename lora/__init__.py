"""LoRA for qwen_mini: adapters as small modules wrapping the model's linears, saved in PEFT's format."""
from .lora import (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PEFT_PREFIX, VALID_TARGETS, AdapterError, LoRALinear,
                   adapters_to_float32, inject, load_adapter, lora_layers, lora_state_dict, mark_only_lora_trainable, merge_all,
                   merge_and_unload, save_adapter, trainable_parameters, unmerge_all)

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "AdapterError", "LoRALinear", "PEFT_PREFIX",
           "VALID_TARGETS", "adapters_to_float32", "inject", "load_adapter", "lora_layers", "lora_state_dict", "mark_only_lora_trainable",
           "merge_all", "merge_and_unload", "save_adapter", "trainable_parameters", "unmerge_all"]
