"""rlft's own Flax models: one decoder for GPT-2 / Llama / Qwen2, scalar heads, HF import/export."""

from rlft.models.config import (NAMED_CONFIGS, ModelConfig, model_config, model_from_section, model_section,
                                tiny_config)
from rlft.models.decoder import Decoder, KVCache, positions_from_mask
from rlft.models.heads import ScalarHead, ScalarModel

__all__ = ["ModelConfig", "NAMED_CONFIGS", "model_config", "model_from_section", "model_section", "tiny_config", "Decoder", "KVCache",
           "positions_from_mask", "ScalarHead", "ScalarModel"]
