import json

import pytest

from openk2 import ConfigError, ModelConfig, param_counts, preset
from openk2.config import KIMI_K2_CONFIG, PRESETS, routed_scaling_factor_for


def test_kimi_k2_counts():
    counts = param_counts(preset("kimi-k2"))
    # Every tensor of the released checkpoint is a parameter except the FP8 block scales
    # (62,495,192 float32 entries) and 61 stale 56-element rotary buffers, which together make
    # up the 1,026,470,731,056 elements the released files hold.
    assert counts["total"] == 1_026_408_232_448
    assert counts["total"] + counts["fp8_block_scales"] + 61 * 56 == 1_026_470_731_056
    assert abs(counts["activated"] / 32.6e9 - 1) < 0.02


def test_deepseek_v3_counts():
    counts = param_counts(preset("deepseek-v3"))
    assert abs(counts["total"] / 671e9 - 1) < 0.005
    assert abs(counts["activated"] / 37e9 - 1) < 0.03


def test_small_presets_sizes():
    tiny, small = param_counts(preset("tiny")), param_counts(preset("small"))
    assert 5e6 <= tiny["total"] <= 15e6
    assert 50e6 <= small["total"] <= 100e6
    c = preset("tiny")
    assert c.n_routed_experts >= 8 and c.num_experts_per_tok >= 2 and c.n_shared_experts == 1
    assert c.first_k_dense_replace == 1 and c.q_lora_rank is not None


@pytest.mark.parametrize("name", list(PRESETS))
def test_counts_match_built_model(name):
    from openk2 import build_model

    model = build_model(preset(name), device="meta")
    built = sum(p.numel() for p in model.parameters())
    built += sum(m.gate.e_score_correction_bias.numel() for m in model.moe_layers())
    assert built == param_counts(model.config)["total"]


def test_kimi_k2_builds_on_meta_without_memory():
    import resource
    import time

    from openk2 import build_model

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    model = build_model(preset("kimi-k2"), device="meta")
    assert time.perf_counter() - start < 20
    assert all(p.device.type == "meta" for p in model.parameters())
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 500  # the real weights would be ~2 TB in bf16


def test_released_config_round_trips():
    config = ModelConfig.from_hf(KIMI_K2_CONFIG)
    again = config.to_hf()
    for key, value in KIMI_K2_CONFIG.items():
        assert again[key] == value, key
    assert config.rope_scaling["factor"] == 32.0 and config.rope_theta == 50000.0


def test_rope_parameters_form_is_accepted():
    legacy = ModelConfig.from_hf(KIMI_K2_CONFIG)
    newer = dict(KIMI_K2_CONFIG)
    scaling = dict(newer.pop("rope_scaling"))
    scaling["rope_type"] = scaling.pop("type")
    newer["rope_parameters"] = {**scaling, "rope_theta": newer.pop("rope_theta")}
    config = ModelConfig.from_hf(newer)
    assert config.rope_theta == legacy.rope_theta
    assert config.rope_scaling["factor"] == 32.0
    assert config.rope_scaling.get("type", config.rope_scaling.get("rope_type")) == "yarn"


def test_transformers_export_is_loadable_config():
    hf = preset("kimi-k2").to_hf(for_transformers=True)
    assert hf["model_type"] == "deepseek_v3" and "quantization_config" not in hf and "auto_map" not in hf
    assert hf["architectures"] == ["DeepseekV3ForCausalLM"]


@pytest.mark.parametrize(
    "change, words",
    [
        ({"num_experts_per_tok": 500}, "num_experts_per_tok"),
        ({"num_key_value_heads": 32}, "num_key_value_heads"),
        ({"model_type": "llama"}, "model_type"),
        ({"n_group": 5}, "n_group"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"topk_group": 3}, "topk_group"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ],
)
def test_bad_config_names_the_field(change, words):
    with pytest.raises(ConfigError, match=words):
        ModelConfig.from_hf({**KIMI_K2_CONFIG, **change})


def test_missing_field_is_named(tmp_path):
    data = dict(KIMI_K2_CONFIG)
    del data["kv_lora_rank"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        ModelConfig.from_hf(tmp_path)


def test_invalid_json_is_reported(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path / "config.json")


def test_routed_scaling_factor_recipe():
    assert abs(routed_scaling_factor_for(384, 8) - 2.8276) < 0.01
    assert abs(routed_scaling_factor_for(64, 6) - 2.446) < 0.01


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("huge")
