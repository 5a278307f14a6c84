"""DeepSeek-V4 configuration (config.py): the presets and transformers' DeepseekV4Config survive to_hf_dict ->
config.json -> from_json_file unchanged (every architecture field); the released hub config.json (compress_ratios
with the MTP entry) and DeepSeek's inference ModelArgs config.json read to the same V4-Flash; each malformed V4
input is one ConfigError naming the value."""
import dataclasses
import json

import pytest

from megatron_ascend.config import ConfigError, ModelConfig, ParallelConfig, validate_all

TRAINING_ONLY = {"aux_loss_alpha", "seq_aux", "moe_router_load_balancing_type", "moe_z_loss_coeff",
                 "moe_expert_capacity_factor", "mtp_loss_scaling_factor", "dsa_indexer_loss_coeff"}
FLASH_RATIOS = [0, 0] + [4, 128] * 20 + [4] + [0]
FLASH_HUB = {"architectures": ["DeepseekV4ForCausalLM"], "vocab_size": 129280, "hidden_size": 4096,
             "moe_intermediate_size": 2048, "num_hidden_layers": 43, "num_attention_heads": 64,
             "num_key_value_heads": 1, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 6,
             "first_k_dense_replace": 0, "max_position_embeddings": 1048576, "rms_norm_eps": 1e-6,
             "rope_theta": 10000, "q_lora_rank": 1024, "qk_rope_head_dim": 64, "head_dim": 512,
             "compress_ratios": FLASH_RATIOS, "sliding_window": 128, "compress_rope_theta": 160000,
             "o_lora_rank": 1024, "o_groups": 8, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
             "num_hash_layers": 3, "hc_mult": 4, "hc_eps": 1e-6, "hc_sinkhorn_iters": 20, "swiglu_limit": 10.0,
             "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc",
             "num_nextn_predict_layers": 1, "rope_scaling": {"type": "yarn", "factor": 16,
                                                             "original_max_position_embeddings": 65536,
                                                             "beta_fast": 32, "beta_slow": 1}}
FLASH_ARGS = {"vocab_size": 129280, "dim": 4096, "moe_inter_dim": 2048, "n_layers": 43, "n_hash_layers": 3,
              "n_mtp_layers": 1, "n_heads": 64, "n_routed_experts": 256, "n_shared_experts": 1,
              "n_activated_experts": 6, "score_func": "sqrtsoftplus", "route_scale": 1.5, "swiglu_limit": 10.0,
              "q_lora_rank": 1024, "head_dim": 512, "rope_head_dim": 64, "norm_eps": 1e-6, "o_groups": 8,
              "o_lora_rank": 1024, "window_size": 128, "compress_ratios": FLASH_RATIOS,
              "compress_rope_theta": 160000, "original_seq_len": 65536, "rope_theta": 10000, "rope_factor": 16,
              "beta_fast": 32, "beta_slow": 1, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
              "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "dtype": "fp8", "scale_fmt": "ue8m0",
              "expert_dtype": "fp4", "max_batch_size": 4, "max_seq_len": 65536}


def _arch(cfg):
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in TRAINING_ONLY}


def _round_trip(cfg, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_hf_dict()))
    return ModelConfig.from_json_file(str(path))


def test_presets_and_transformers_configs_round_trip(tmp_path):
    from transformers import DeepseekV4Config
    from megatron_ascend.planner.presets import deepseek_v4_pro
    from tests import v4_reference as R
    pro = deepseek_v4_pro()
    assert _arch(_round_trip(pro, tmp_path)) == _arch(pro)
    tiny = ModelConfig.from_hf_dict(DeepseekV4Config(**R.tiny_kwargs()).to_dict())
    assert _arch(_round_trip(tiny, tmp_path)) == _arch(tiny)
    # transformers reads our config.json to the same architecture
    hf = DeepseekV4Config(**{k: v for k, v in tiny.to_hf_dict().items() if k != "architectures"})
    assert _arch(ModelConfig.from_hf_dict(hf.to_dict())) == _arch(tiny)
    assert hf.layer_types == [R.SLIDING, R.CSA, R.HCA, R.CSA, R.HCA]
    assert hf.mlp_layer_types == ["hash_moe", "hash_moe", "moe", "moe", "moe"]
    assert hf.rope_parameters["compress"]["rope_type"] == "yarn" and hf.rope_parameters["main"]["rope_type"] == \
        "default"
    assert tiny.rope_scaling.factor == 4.0 and tiny.compress_rope_theta == 40000.0 and tiny.rope_theta == 10000.0
    assert tiny.attention_type(5) == R.SLIDING  # the MTP layer: not listed -> sliding


def test_released_hub_and_inference_configs_read_the_same():
    hub = ModelConfig.from_hf_dict(FLASH_HUB)
    args = ModelConfig.from_hf_dict(FLASH_ARGS)
    assert hub.model_type == args.model_type == "deepseek_v4"
    assert _arch(hub) == _arch(args)
    assert len(hub.compress_ratios) == 44 and hub.compress_ratio(43) == 0 and hub.attention_type(2) == \
        "compressed_sparse_attention" and hub.attention_type(3) == "heavily_compressed_attention"
    assert hub.rope_scaling.factor == 16 and hub.rope_scaling.original_max_position_embeddings == 65536
    assert hub.num_hash_layers == 3 and hub.qk_nope_head_dim == 448 and hub.intermediate_size == 2048
    validate_all(hub, ParallelConfig(world_size=8, tensor_model_parallel_size=8))


@pytest.mark.parametrize("change,match", [
    (dict(compress_ratios=[0, 4, 128]), "compress_ratios has 3 entries"),
    (dict(num_key_value_heads=2), "num_key_value_heads 2"),
    (dict(attention_dropout=0.1), "attention_dropout 0.1"),
    (dict(mlp_layer_types=["moe", "hash_moe"] + ["moe"] * 41), "hash_moe for the first layers"),
    (dict(compress_rates={"compressed_sparse_attention": 8, "heavily_compressed_attention": 8},
          layer_types=["sliding_attention"] * 43, compress_ratios=None), "same ratio 8"),
    (dict(o_groups=7), "o_groups 7"),
    (dict(hc_mult=0), "hc_mult"),
])
def test_bad_v4_configs_are_one_config_error(change, match):
    d = dict(FLASH_HUB, **change)
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf_dict(d)


def test_flags_overriding_layers_must_keep_the_ratios_consistent(tmp_path):
    from megatron_ascend.arguments import model_config_from_args
    from megatron_ascend.training.entry import parse
    path = tmp_path / "config.json"
    path.write_text(json.dumps(FLASH_HUB))
    args = parse(["--model-config", str(path), "--num-layers", "4", "--train-iters", "1"], "pretrain")
    with pytest.raises(ConfigError, match="compress_ratios has 44 entries"):
        model_config_from_args(args)
    validate_all(ModelConfig.from_hf_dict(FLASH_HUB), ParallelConfig(world_size=4, tensor_model_parallel_size=4))
    with pytest.raises(ConfigError, match="o_groups 8 is not divisible"):
        validate_all(ModelConfig.from_hf_dict(FLASH_HUB), ParallelConfig(world_size=16,
                                                                         tensor_model_parallel_size=16))
