"""openk2: the Kimi K2 system as a hackable PyTorch project."""

from openk2.config import ConfigError, ModelConfig, param_counts, preset
from openk2.model import CheckpointError, K2ForCausalLM, build_model, load_model, save_model

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "K2ForCausalLM", "ModelConfig", "build_model", "load_model",
    "param_counts", "preset", "save_model",
]
