"""Numerical parity with transformers' DeepseekV3ForCausalLM, both directions, fp32."""

import copy
import random

import pytest
import torch

from openk2 import ModelConfig, build_model, load_model, save_model

transformers = pytest.importorskip("transformers")


def random_config(seed: int) -> dict:
    rng = random.Random(seed)
    heads = rng.choice([2, 3, 4])
    n_group = rng.choice([1, 1, 2, 4])
    experts = n_group * rng.choice([2, 3, 4])
    topk_group = rng.randint(1, n_group)
    top_k = rng.randint(1, min(4, topk_group * (experts // n_group)))
    yarn = rng.random() < 0.6 or seed == 0
    first_dense = rng.randint(0, 2)
    config = {
        "model_type": "deepseek_v3",
        "vocab_size": rng.choice([97, 128, 256]),
        "hidden_size": rng.choice([32, 48, 64]),
        "intermediate_size": rng.choice([40, 64, 96]),
        "moe_intermediate_size": rng.choice([16, 24, 32]),
        "num_hidden_layers": first_dense + rng.randint(1, 2),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "n_shared_experts": rng.choice([1, 2]),
        "n_routed_experts": experts,
        "num_experts_per_tok": top_k,
        "n_group": n_group,
        "topk_group": topk_group,
        "routed_scaling_factor": rng.choice([1.0, 2.5, 2.827]),
        "first_k_dense_replace": first_dense,
        "q_lora_rank": rng.choice([None, 24, 48]),
        "kv_lora_rank": rng.choice([16, 32]),
        "qk_nope_head_dim": rng.choice([8, 16, 24]),
        "qk_rope_head_dim": rng.choice([4, 8, 16]),
        "v_head_dim": rng.choice([8, 16, 20]),
        "max_position_embeddings": 512,
        "rope_theta": rng.choice([10000.0, 50000.0]),
        "rope_interleave": rng.random() < 0.75,
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.2,  # large weights exercise routing and rope more than 0.02
    }
    if yarn:
        factor = rng.choice([4.0, 32.0, 40.0])
        config["rope_scaling"] = {
            "type": "yarn", "factor": factor, "beta_fast": rng.choice([1.0, 32.0]), "beta_slow": 1.0,
            "mscale": 1.0, "mscale_all_dim": rng.choice([0.0, 1.0]), "original_max_position_embeddings": 16,
        }
        config["max_position_embeddings"] = int(16 * factor)
    if seed == 0:  # K2's own YaRN settings
        config["rope_scaling"] = {
            "type": "yarn", "factor": 32.0, "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 16,
        }
        config["max_position_embeddings"] = 512
    return config


CONFIGS = [random_config(seed) for seed in range(6)]


def test_configs_cover_the_variations():
    assert any(c["q_lora_rank"] is None for c in CONFIGS) and any(c["q_lora_rank"] for c in CONFIGS)
    assert any("rope_scaling" in c for c in CONFIGS) and any("rope_scaling" not in c for c in CONFIGS)
    assert any(c["n_group"] > 1 for c in CONFIGS)
    assert len({c["first_k_dense_replace"] for c in CONFIGS}) > 1


def _hf_model(config: dict):
    hf_config = transformers.DeepseekV3Config(**copy.deepcopy(config))
    hf_config._attn_implementation = "eager"
    torch.manual_seed(1)
    model = transformers.DeepseekV3ForCausalLM(hf_config).eval()
    with torch.no_grad():  # non-zero router bias, so selection-only bias use is tested
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.uniform_(-0.3, 0.3)
    return model


def _inputs(config: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, config["vocab_size"], (3, 37), generator=g)


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_hf_to_openk2(tmp_path, index):
    config = CONFIGS[index]
    hf = _hf_model(config)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32).eval()
    ids = _inputs(config)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_openk2_to_hf(tmp_path, index):
    config = ModelConfig.from_hf(CONFIGS[index])
    ours = build_model(config, seed=3).eval()
    with torch.no_grad():
        for moe in ours.moe_layers():
            moe.gate.e_score_correction_bias.uniform_(-0.3, 0.3)
    save_model(ours, tmp_path)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = _inputs(CONFIGS[index])
    with torch.no_grad():
        expected = ours(ids)
        got = hf(ids).logits
    assert (got - expected).abs().max().item() < 1e-4


def test_sharded_save_round_trip(tmp_path):
    config = ModelConfig.from_hf(CONFIGS[0])
    ours = build_model(config, seed=5).eval()
    save_model(ours, tmp_path, max_shard_bytes=20_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    again = load_model(tmp_path)
    ids = _inputs(CONFIGS[0])
    with torch.no_grad():
        assert torch.equal(ours(ids), again(ids))
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() < 1e-4
