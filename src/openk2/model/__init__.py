"""The K2 network only: no training, inference or parallelism code lives here."""

from openk2.model.attention import MLAttention
from openk2.model.hf import CheckpointError, load_model, save_model
from openk2.model.moe import MLP, Experts, MoE, Router
from openk2.model.transformer import K2ForCausalLM, K2Model, build_model, decoder_layer_prefix

__all__ = [
    "CheckpointError", "Experts", "K2ForCausalLM", "K2Model", "MLAttention", "MLP", "MoE", "Router",
    "build_model", "decoder_layer_prefix", "load_model", "save_model",
]
