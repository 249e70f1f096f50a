"""rlft's own Flax models: one decoder for GPT-2 / Llama / Qwen2, scalar heads, HF import/export."""

from rlft.models.config import ModelConfig, tiny_config
from rlft.models.decoder import Decoder, KVCache, positions_from_mask
from rlft.models.heads import ScalarHead, ScalarModel

__all__ = ["ModelConfig", "tiny_config", "Decoder", "KVCache", "positions_from_mask",
           "ScalarHead", "ScalarModel"]
