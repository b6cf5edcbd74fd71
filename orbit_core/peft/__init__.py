from orbit_core.peft.lora import (
    LoRALinear,
    adapter_disabled,
    adapter_parameters,
    adapter_state_dict,
    apply_lora,
    load_adapter_state_dict,
    lora_modules,
    merge_lora,
)

__all__ = [
    "LoRALinear", "adapter_disabled", "adapter_parameters", "adapter_state_dict", "apply_lora",
    "load_adapter_state_dict", "lora_modules", "merge_lora",
]
