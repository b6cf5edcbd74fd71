from orbit_core.models.checkpoint import load_model, load_tokenizer, read_hf_config, save_model
from orbit_core.models.config import DecoderConfig
from orbit_core.models.transformer import DecoderLM, KVCache

__all__ = ["load_model", "load_tokenizer", "read_hf_config", "save_model", "DecoderConfig", "DecoderLM", "KVCache"]
