"""The K2 decoder: embedding, pre-norm MLA + (dense | MoE) blocks, final norm, untied LM head.

Module names follow the HF DeepseekV3 checkpoint (`model.layers.{i}.self_attn.q_b_proj`, ...),
so state-dict keys need no renaming except for the stacked experts (see model/hf.py).
`K2ForCausalLM.forward(input_ids [B, T]) -> logits [B, T, V]` is the whole interface; the
optimizer's statistics (per-head max logits, tokens per expert) are read from the modules.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from openk2.config import ModelConfig
from openk2.model.attention import MLAttention
from openk2.model.init import NormalInit
from openk2.model.moe import MLP, Experts, MoE, Router
from openk2.model.norm import RMSNorm
from openk2.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: MLP | MoE = (
            MoE(config) if config.is_moe_layer(layer_idx)
            else MLP(config.hidden_size, config.intermediate_size)
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class K2Model(nn.Module):
    """Everything below the LM head (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        cos, sin = self.rotary_emb(position_ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class K2ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = K2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V]."""
        return self.lm_head(self.model(input_ids, position_ids))

    # ---- structure -------------------------------------------------------------------------
    def attention_layers(self) -> Iterator[MLAttention]:
        for layer in self.model.layers:
            yield layer.self_attn

    def moe_layers(self) -> Iterator[MoE]:
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoE):
                yield layer.mlp

    # ---- statistics the optimizer reads --------------------------------------------------
    def set_track_max_logits(self, enabled: bool) -> None:
        for attn in self.attention_layers():
            attn.track_max_logits = enabled

    def max_logits(self) -> torch.Tensor:
        """[layers, heads]: the largest pre-softmax logit per head since the last reset."""
        return torch.stack([attn.max_logits for attn in self.attention_layers()])

    def tokens_per_expert(self) -> torch.Tensor:
        """[moe_layers, experts]: tokens routed to each expert since the last reset."""
        layers = list(self.moe_layers())
        if not layers:
            return torch.zeros(0, 0)
        return torch.stack([moe.tokens_per_expert for moe in layers])

    def reset_stats(self) -> None:
        for attn in self.attention_layers():
            attn.reset_max_logits()
        for moe in self.moe_layers():
            moe.reset_tokens_per_expert()
            moe.aux_loss = None

    def aux_loss(self) -> torch.Tensor | None:
        losses = [moe.aux_loss for moe in self.moe_layers() if moe.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    # ---- initialisation -------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for every matrix of `normal_init_tensors`, then
        `init_constants`. With a seed the values come from `NormalInit` (model/init.py): the
        same on any device and under any sharding (`train.distributed.materialize` draws a
        rank's rows alone); without one, from torch's global generator."""
        std = self.config.initializer_range
        draws = None if seed is None else NormalInit(seed, std)
        for weight in self.normal_init_tensors():
            if draws is None:
                weight.normal_(0.0, std)
            else:
                draws.fill(weight, weight.shape)
        self.init_constants()

    def normal_init_tensors(self) -> Iterator[torch.Tensor]:
        """The tensors drawn from Normal(0, initializer_range), in draw order (module order):
        projection, embedding, head and router weights, and the stacked experts."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, Router)):
                yield module.weight
            elif isinstance(module, Experts):
                yield from (module.gate_proj, module.up_proj, module.down_proj)

    @torch.no_grad()
    def init_constants(self) -> None:
        """Everything not drawn at random: ones for norms, zeros for biases and the router bias,
        then `reset_buffers`."""
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
            elif isinstance(module, Router):
                module.e_score_correction_bias.zero_()
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """The non-persistent buffers, which no checkpoint holds: rotary tables recomputed,
        statistics zeroed (needed after `to_empty` from meta)."""
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.reset_parameters()
        for attn in self.attention_layers():
            attn.max_logits.zero_()
        for moe in self.moe_layers():
            moe.tokens_per_expert.zero_()


def decoder_layer_prefix(name: str) -> str | None:
    """"model.layers.{i}" for a state-dict key inside decoder layer i, else None (embedding,
    final norm, LM head): the unit in which large models are sharded, saved and exported."""
    parts = name.split(".")
    return ".".join(parts[:3]) if parts[:2] == ["model", "layers"] and len(parts) > 3 else None


def build_model(
    config: ModelConfig,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = 0,
) -> K2ForCausalLM:
    """A randomly initialised model. device="meta" builds shapes only (no memory), which is how
    large presets are instantiated before sharding or loading weights."""
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = K2ForCausalLM(config)
    if dtype is not None:
        model.to(dtype=dtype)
        # The router and the optimizer's statistics stay in float32 whatever the model dtype.
        for router in (m for m in model.modules() if isinstance(m, Router)):
            router.float()
        for attn in model.attention_layers():
            attn.max_logits = attn.max_logits.float()
    if device.type == "meta":
        return model
    model.to_empty(device=device)
    model.init_weights(seed)
    return model
