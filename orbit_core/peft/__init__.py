from orbit_core.peft.base import (
    AdapterLayer,
    adapter_disabled,
    adapter_modules,
    adapter_parameters,
    adapter_state_dict,
    load_adapter_state_dict,
    merge_adapters,
)
from orbit_core.peft.lora import LoRALinear, apply_lora
from orbit_core.peft.oft import OFTLinear, apply_oft, project_oft_

__all__ = [
    "AdapterLayer", "adapter_disabled", "adapter_modules", "adapter_parameters", "adapter_state_dict",
    "load_adapter_state_dict", "merge_adapters", "LoRALinear", "apply_lora", "OFTLinear", "apply_oft", "project_oft_",
]
