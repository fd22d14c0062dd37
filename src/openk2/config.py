"""Model configuration: HF DeepseekV3 field names, validation, presets (K2_SPEC §1).

`ModelConfig` reads and writes the `config.json` of the released Kimi K2 checkpoint
(`model_type` "kimi_k2") and of transformers' DeepseekV3 (`deepseek_v3`), including the
legacy `rope_scaling` dict and the newer `rope_parameters`. Keys openk2 does not model
(auto_map, quantization_config, ...) are kept in `extra` so a released config round-trips.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A model config or recipe is invalid; the message names the field and the fix."""


MODEL_TYPES = ("kimi_k2", "deepseek_v3")


@dataclass
class ModelConfig:
    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 64
    num_key_value_heads: int = 64
    n_shared_experts: int = 1
    n_routed_experts: int = 384
    num_experts_per_tok: int = 8
    routed_scaling_factor: float = 2.827
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rope_theta: float = 50000.0
    # YaRN parameters ({"type": "yarn", "factor": ..., ...}) or None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    bos_token_id: int | None = 163584
    eos_token_id: int | None = 163585
    pad_token_id: int | None = None
    model_type: str = "kimi_k2"
    torch_dtype: str = "bfloat16"
    # Keys of config.json that openk2 does not interpret, kept for round-trips.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        positive = [
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "max_position_embeddings", "moe_layer_freq",
        ]
        for name in positive:
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name}={value!r} must be a positive integer")
        need(self.model_type in MODEL_TYPES,
             f"model_type={self.model_type!r} is not supported; use one of {', '.join(MODEL_TYPES)}")
        need(self.num_key_value_heads == self.num_attention_heads,
             f"num_key_value_heads={self.num_key_value_heads} must equal num_attention_heads="
             f"{self.num_attention_heads}: MLA has one key/value per head")
        need(self.qk_rope_head_dim % 2 == 0,
             f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (rotary pairs)")
        need(self.q_lora_rank is None or self.q_lora_rank > 0,
             f"q_lora_rank={self.q_lora_rank!r} must be a positive integer or null (no query LoRA)")
        need(self.hidden_act == "silu", f"hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU) is supported")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace={self.first_k_dense_replace} must be in [0, num_hidden_layers="
             f"{self.num_hidden_layers}]")
        need(not self.tie_word_embeddings,
             "tie_word_embeddings=true is not supported: K2 has an untied LM head")
        need(self.num_hidden_layers > self.first_k_dense_replace or self.intermediate_size > 0,
             "intermediate_size must be positive when the model has dense layers")
        if self.first_k_dense_replace > 0:
            need(self.intermediate_size > 0, f"intermediate_size={self.intermediate_size} must be positive")
        if self.moe_layers:
            E, k = self.n_routed_experts, self.num_experts_per_tok
            need(self.moe_intermediate_size > 0,
                 f"moe_intermediate_size={self.moe_intermediate_size} must be positive")
            need(0 < k <= E, f"num_experts_per_tok={k} must be in [1, n_routed_experts={E}]")
            need(self.n_shared_experts >= 0, f"n_shared_experts={self.n_shared_experts} must be >= 0")
            need(self.n_group >= 1 and E % self.n_group == 0,
                 f"n_routed_experts={E} must be divisible by n_group={self.n_group}")
            need(1 <= self.topk_group <= self.n_group,
                 f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
            if self.n_group > 1:
                need(E // self.n_group >= 2,
                     f"n_group={self.n_group} leaves fewer than 2 experts per group "
                     "(group scores sum the top 2)")
                need(k <= self.topk_group * (E // self.n_group),
                     f"num_experts_per_tok={k} exceeds the experts in topk_group={self.topk_group} groups")
            need(self.scoring_func == "sigmoid",
                 f"scoring_func={self.scoring_func!r}: only 'sigmoid' (DeepSeek-V3/K2 router) is supported")
            need(self.topk_method == "noaux_tc",
                 f"topk_method={self.topk_method!r}: only 'noaux_tc' is supported")
            need(self.routed_scaling_factor > 0,
                 f"routed_scaling_factor={self.routed_scaling_factor} must be positive")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            kind = rs.get("rope_type", rs.get("type"))
            need(kind in ("yarn", "default", None),
                 f"rope_scaling type {kind!r} is not supported; use 'yarn' or null")
            if kind == "yarn":
                need("original_max_position_embeddings" in rs,
                     "rope_scaling (yarn) needs original_max_position_embeddings")

    # ---- HF interop ----------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> "ModelConfig":
        """Build from a config.json path, a checkpoint folder, or a dict (deep-copied)."""
        if isinstance(source, dict):
            data = copy.deepcopy(source)
            where = "config"
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ConfigError(f"{path}: no such config.json")
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
            where = str(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        model_type = data.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"{where}: model_type={model_type!r} is not a K2 network; expected one of "
                f"{', '.join(MODEL_TYPES)}"
            )
        data.pop("architectures", None)
        # Newer transformers: rope_parameters holds rope_theta and the scaling params.
        rope_parameters = data.pop("rope_parameters", None)
        if rope_parameters:
            params = dict(rope_parameters)
            data.setdefault("rope_theta", params.pop("rope_theta", 10000.0))
            params.pop("partial_rotary_factor", None)
            kind = params.get("rope_type", params.get("type", "default"))
            if kind != "default" and not data.get("rope_scaling"):
                params["type"] = kind
                params.pop("rope_type", None)
                data["rope_scaling"] = params
        if data.get("rope_scaling"):
            rs = dict(data["rope_scaling"])
            kind = rs.get("rope_type", rs.get("type", "default"))
            data["rope_scaling"] = None if kind == "default" else rs
        if "dtype" in data and "torch_dtype" not in data:
            data["torch_dtype"] = data.pop("dtype")
        fields = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]
        missing = [name for name in required if name not in data]
        if missing:
            raise ConfigError(f"{where}: missing required field(s) {', '.join(missing)}")
        # Fields absent from an HF config take transformers' DeepseekV3 defaults, not K2's.
        defaults = dict(HF_DEFAULTS)
        kwargs = {k: data.pop(k) for k in list(data) if k in fields}
        for k, v in defaults.items():
            kwargs.setdefault(k, v)
        kwargs.setdefault("num_key_value_heads", kwargs["num_attention_heads"])
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        # Values transformers derives or that only steer its generation loop.
        for derived in ("qk_head_dim", "head_dim", "ep_size", "output_router_logits", "num_mtp_layers"):
            data.pop(derived, None)
        try:
            return cls(**kwargs, extra=data)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf(self, for_transformers: bool = False) -> dict[str, Any]:
        """The config.json dict. `for_transformers` writes what transformers' DeepseekV3 loads
        (model_type deepseek_v3, no remote-code auto_map, no FP8 quantization_config)."""
        out: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"]}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            out[f.name] = copy.deepcopy(getattr(self, f.name))
        out.update(copy.deepcopy(self.extra))
        if for_transformers:
            out["model_type"] = "deepseek_v3"
            for key in ("auto_map", "quantization_config"):
                out.pop(key, None)
            if out["rope_scaling"] is not None:
                out["rope_scaling"] = dict(out["rope_scaling"])
                kind = out["rope_scaling"].get("rope_type", out["rope_scaling"].get("type"))
                out["rope_scaling"]["type"] = kind
                out["rope_scaling"]["rope_type"] = kind
        return dict(sorted(out.items()))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# transformers' DeepseekV3Config defaults, used for fields an HF config.json leaves out.
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 129280, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
    "q_lora_rank": 1536, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "max_position_embeddings": 4096,
    "rope_theta": 10000.0, "rope_scaling": None, "rope_interleave": True, "rms_norm_eps": 1e-6,
    "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None, "num_nextn_predict_layers": 0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


def routed_scaling_factor_for(n_experts: int, top_k: int, draws: int = 20000, seed: int = 0) -> float:
    """Moonlight's recipe: E[1/||p||_2] with p the renormalised top-k of sigmoid(N(0,1) logits).

    Gives ~2.83 for (384, 8) and ~2.45 for (64, 6); presets compute it for their own (E, k).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(draws, n_experts, generator=g, dtype=torch.float64).sigmoid()
    top = scores.topk(top_k, dim=-1).values
    p = top / top.sum(-1, keepdim=True)
    return round(float((1.0 / p.norm(dim=-1)).mean()), 3)


# ---- presets -----------------------------------------------------------------------------

# The released moonshotai/Kimi-K2 config.json, verbatim.
KIMI_K2_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 163584,
    "eos_token_id": 163585,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 131072,
    "model_type": "kimi_k2",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 384,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 64,
    "num_nextn_predict_layers": 0,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 50000.0,
    "routed_scaling_factor": 2.827,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.48.3",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 163840,
}

_DEEPSEEK_V3_CHANGES: dict[str, Any] = {
    "model_type": "deepseek_v3",
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_routed_experts": 256,
    "first_k_dense_replace": 3,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "vocab_size": 129280,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096, "type": "yarn",
    },
    "max_position_embeddings": 163840,
    "num_nextn_predict_layers": 1,
    "bos_token_id": 0,
    "eos_token_id": 1,
}

_MOONLIGHT_CHANGES: dict[str, Any] = {
    "model_type": "deepseek_v3",
    "hidden_size": 2048,
    "intermediate_size": 11264,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "routed_scaling_factor": 2.446,
    "q_lora_rank": None,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
}


def _small_model(**sizes: Any) -> dict[str, Any]:
    """A K2-shaped config at a CPU size: same mechanisms, smaller numbers, no FP8, no remote code."""
    base = {k: v for k, v in KIMI_K2_CONFIG.items() if k not in ("auto_map", "quantization_config")}
    base.update(
        model_type="kimi_k2", torch_dtype="float32", rope_scaling=None, bos_token_id=None,
        eos_token_id=None, max_position_embeddings=4096, rope_theta=10000.0,
    )
    base.update(sizes)
    base["routed_scaling_factor"] = routed_scaling_factor_for(
        base["n_routed_experts"], base["num_experts_per_tok"]
    )
    return base


PRESETS: dict[str, Any] = {
    "kimi-k2": lambda: KIMI_K2_CONFIG,
    "deepseek-v3": lambda: {**KIMI_K2_CONFIG, **_DEEPSEEK_V3_CHANGES},
    "moonlight-16b-a3b": lambda: {
        k: v for k, v in {**KIMI_K2_CONFIG, **_MOONLIGHT_CHANGES}.items() if k != "quantization_config"
    },
    # The CPU speedrun model: ~8M parameters, 8 routed experts top-2 + 1 shared, 1 dense layer.
    "tiny": lambda: _small_model(
        vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=128,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    ),
    # ~90M parameters: 16 routed experts top-2 + 1 shared.
    "small": lambda: _small_model(
        vocab_size=32768, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, n_routed_experts=16,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=256,
        kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset (see `PRESETS`), with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    data = copy.deepcopy(PRESETS[name]())
    data.update(overrides)
    return ModelConfig.from_hf(data)


def param_counts(config: ModelConfig) -> dict[str, int]:
    """Parameter counts from the config alone (no tensors are built).

    total: every parameter of the network plus the router-bias buffers, which the
    checkpoint stores (embedding and LM head included, no MTP layer).
    activated: what one token touches: embedding row table and LM head included, as the
    K2 and DeepSeek-V3 reports count, attention and dense layers, and per MoE layer the
    router, the shared experts and num_experts_per_tok routed experts.
    """
    c = config
    H, heads = c.hidden_size, c.num_attention_heads
    if c.q_lora_rank is None:
        q = H * heads * c.qk_head_dim
    else:
        q = H * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * heads * c.qk_head_dim
    kv = H * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
    kv += c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim)
    attention = q + kv + heads * c.v_head_dim * H + (H if c.attention_bias else 0)
    norms = 2 * H
    expert = 3 * H * c.moe_intermediate_size
    dense = 3 * H * c.intermediate_size
    router = c.n_routed_experts * H + c.n_routed_experts
    embed = c.vocab_size * H
    total = activated = 2 * embed + H
    for i in range(c.num_hidden_layers):
        layer = attention + norms
        if c.is_moe_layer(i):
            shared = c.n_shared_experts * expert
            total += layer + router + shared + c.n_routed_experts * expert
            activated += layer + router + shared + c.num_experts_per_tok * expert
        else:
            total += layer + dense
            activated += layer + dense
    fp8 = c.extra.get("quantization_config", {})
    out = {"total": total, "activated": activated, "embedding": embed, "lm_head": embed}
    if fp8.get("quant_method") == "fp8" and fp8.get("weight_block_size"):
        out["fp8_block_scales"] = _fp8_scale_count(c, fp8["weight_block_size"])
    return out


def _fp8_scale_count(c: ModelConfig, block: list[int]) -> int:
    """Float32 `weight_scale_inv` entries an FP8 block-quantised checkpoint stores beside its
    matrices (every projection but embedding, LM head and router is quantised)."""
    br, bc = block

    def scales(rows: int, cols: int) -> int:
        return math.ceil(rows / br) * math.ceil(cols / bc)

    H, heads, inter = c.hidden_size, c.num_attention_heads, c.moe_intermediate_size
    attn = scales(c.kv_lora_rank + c.qk_rope_head_dim, H)
    attn += scales(heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
    attn += scales(H, heads * c.v_head_dim)
    if c.q_lora_rank is None:
        attn += scales(heads * c.qk_head_dim, H)
    else:
        attn += scales(c.q_lora_rank, H) + scales(heads * c.qk_head_dim, c.q_lora_rank)

    def mlp(width: int) -> int:
        return 2 * scales(width, H) + scales(H, width)

    total = 0
    for i in range(c.num_hidden_layers):
        total += attn
        if c.is_moe_layer(i):
            total += c.n_routed_experts * mlp(inter) + (mlp(inter * c.n_shared_experts)
                                                        if c.n_shared_experts else 0)
        else:
            total += mlp(c.intermediate_size)
    return total
