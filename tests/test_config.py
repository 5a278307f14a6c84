"""One test per validation rule: the ConfigError message names the values and the fix, and the CLI turns
it into one line on stderr with exit code 2."""
import json
import subprocess
import sys

import pytest

from megatron_ascend.arguments import build_configs, parse_args
from megatron_ascend.config import (ConfigError, ModelConfig, ParallelConfig, TrainingConfig, padded_vocab_size,
                                    pipeline_layer_split, validate_all)
from tests.harness import kernel_env

TINY = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
        "--q-lora-rank", "32", "--kv-lora-rank", "16", "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8",
        "--v-head-dim", "16", "--num-experts", "8", "--moe-ffn-hidden-size", "32", "--moe-router-topk", "2",
        "--moe-router-num-groups", "2", "--moe-router-group-topk", "1", "--first-k-dense-replace", "1",
        "--vocab-size", "256", "--seq-length", "32", "--max-position-embeddings", "128"]

# (flags, world size, fragments the message must contain)
RULES = [
    (["--tensor-model-parallel-size", "4"], 6, ["world size 6", "tensor-model-parallel-size 4", "multiple of 4"]),
    (["--pipeline-model-parallel-size", "3"], 8, ["world size 8", "pipeline-model-parallel-size 3"]),
    (["--expert-model-parallel-size", "3"], 6, ["expert-model-parallel-size 3", "num-experts 8",
                                                 "divisor of 8"]),
    (["--expert-model-parallel-size", "4", "--tensor-model-parallel-size", "2", "--expert-tensor-parallel-size",
      "2"], 4, ["expert-model-parallel-size 4", "does not divide the 4 ranks"]),
    (["--pipeline-model-parallel-size", "3"], 3, ["num-layers 4", "pipeline-model-parallel-size 3"]),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"], 2,
     ["num-layers 4", "num-layers-per-virtual-pipeline-stage 3"]),
    (["--tensor-model-parallel-size", "8", "--num-attention-heads", "4", "--ffn-hidden-size", "256",
      "--moe-ffn-hidden-size", "64"], 8, ["num-attention-heads 4", "tensor-model-parallel-size 8"]),
    (["--global-batch-size", "6", "--micro-batch-size", "2"], 2, ["global-batch-size 6", "micro-batch-size 2",
                                                                 "data-parallel-size 2", "multiple of 4"]),
    (["--moe-router-topk-method", "top2_magic"], 1, ["unknown router type", "top2_magic"]),
    (["--moe-router-score-function", "relu"], 1, ["unknown router scoring function", "relu"]),
    (["--moe-router-topk", "9"], 1, ["num_experts_per_tok 9", "n_routed_experts 8"]),
    (["--moe-router-num-groups", "3"], 1, ["n_group 3", "n_routed_experts 8"]),
    (["--decoder-first-pipeline-num-layers", "1", "--pipeline-model-parallel-size", "3"], 3,
     ["decoder-first/last-pipeline-num-layers", "remaining 3"]),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "33"], 2,
     ["seq-length 33", "divisible by 2"]),
    (["--recompute-granularity", "full"], 1, ["--recompute-method"]),
    (["--lr-decay-style", "exp"], 1, ["--lr-decay-style 'exp'"]),
    (["--bf16", "--fp16"], 1, ["--bf16 and --fp16"]),
    (["--min-lr", "1.0", "--lr", "0.1"], 1, ["--min-lr 1.0", "--lr 0.1"]),
    (["--split", "a,b"], 1, ["--split 'a,b'"]),
    (["--recompute-modules", "everything"], 1, ["--recompute-modules everything"]),
    (["--moe-token-dispatcher-type", "deepep_magic"], 1, ["moe-token-dispatcher-type 'deepep_magic'"]),
]


@pytest.mark.parametrize("flags,world,fragments", RULES, ids=[" ".join(r[0])[:60] for r in RULES])
def test_rule_message(flags, world, fragments):
    with pytest.raises(ConfigError) as e:
        build_configs(parse_args(TINY + flags), world)
    msg = str(e.value)
    for frag in fragments:
        assert frag in msg, (frag, msg)
    assert "\n" not in msg


@pytest.mark.parametrize("flags,world,fragments", RULES[:6], ids=[str(i) for i in range(6)])
def test_cli_prints_one_line_and_exits_2(flags, world, fragments, capsys, monkeypatch):
    from megatron_ascend import pretrain
    monkeypatch.setenv("WORLD_SIZE", str(world))
    try:
        rc = pretrain.main(TINY + flags)
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and fragments[0] in err


def test_cli_subprocess_no_traceback():
    r = subprocess.run([sys.executable, "-m", "megatron_ascend.pretrain", *TINY, "--expert-model-parallel-size",
                        "3"], capture_output=True, text=True,
                       env={**kernel_env(), "WORLD_SIZE": "6", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert "expert-model-parallel-size 3 does not divide num-experts 8" in r.stderr


def test_valid_tiny_config_builds_and_derives():
    model, par, opt, train, data = build_configs(parse_args(TINY + ["--tensor-model-parallel-size", "2",
                                                                    "--pipeline-model-parallel-size", "2",
                                                                    "--expert-model-parallel-size", "2"]), 8)
    assert par.dp == 2 and par.etp == 2 and par.edp == 1 and model.num_moe_layers == 3
    assert model.is_moe_layer(1) and not model.is_moe_layer(0)
    assert pipeline_layer_split(4, 2) == [[2, 2]]
    assert pipeline_layer_split(8, 2, 2) == [[2, 2], [2, 2]]
    assert pipeline_layer_split(6, 3, 1, first=1, last=1) == [[1, 4, 1]]
    assert padded_vocab_size(129280, 128, 4) == 129536


def _write(tmp_path, d):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    return str(p)


V3_HUB = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
          "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
          "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
          "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
          "v_head_dim": 128, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
          "first_k_dense_replace": 3, "moe_layer_freq": 1, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc",
          "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5, "rms_norm_eps": 1e-6,
          "max_position_embeddings": 163840, "rope_theta": 10000,
          "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
          "tie_word_embeddings": False, "quantization_config": {"quant_method": "fp8"}}


def test_hf_hub_style_config(tmp_path):
    m = ModelConfig.from_json_file(_write(tmp_path, V3_HUB))
    assert m.rope_scaling.factor == 40 and m.rope_scaling.mscale_all_dim == 1.0 and m.rope_theta == 10000
    assert m.n_group == 8 and m.topk_group == 4 and m.num_nextn_predict_layers == 1 and m.num_moe_layers == 58


def test_transformers_style_config_and_flag_override(tmp_path):
    from transformers import DeepseekV2Config, DeepseekV3Config, DeepseekV4Config
    d = DeepseekV3Config(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
                                          "original_max_position_embeddings": 128}).to_dict()
    m = ModelConfig.from_hf_dict(d)
    assert m.rope_scaling.factor == 4.0 and m.rope_scaling.original_max_position_embeddings == 128
    v2 = ModelConfig.from_hf_dict(DeepseekV2Config(q_lora_rank=None, num_experts_per_tok=6, n_group=1,
                                                   topk_group=1).to_dict())
    assert v2.q_lora_rank is None and v2.scoring_func == "softmax" and v2.topk_method == "greedy"
    v4 = ModelConfig.from_hf_dict(DeepseekV4Config().to_dict())
    assert v4.hc_mult == 4 and v4.num_hash_layers == 3 and len(v4.compress_ratios) == 43
    assert v4.compress_ratios[3] == 4 and v4.compress_ratios[0] == 128 and v4.compress_rope_theta == 160000.0
    path = _write(tmp_path, V3_HUB)
    model, *_ = build_configs(parse_args(["--model-config", path, "--num-layers", "4", "--seq-length", "4096"]), 1)
    assert model.num_hidden_layers == 4 and model.hidden_size == 7168 and model.rope_scaling.factor == 40


def test_bad_model_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_json_file(str(tmp_path / "nope.json"))
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json_file(str(p))
    with pytest.raises(ConfigError, match="llama"):
        ModelConfig.from_hf_dict({"model_type": "llama"})
