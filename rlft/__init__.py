"""rlft: scalable RL fine-tuning of language models in JAX."""

from rlft.api import Model, load
from rlft.errors import RlftError

__version__ = "0.1.0"
__all__ = ["Model", "load", "RlftError", "__version__"]
