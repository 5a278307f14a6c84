"""The project's own launch scripts run, shrunk through their environment knobs, so that no shipped script rots.

* pretrain_scripts/pretrain_deepseek_v3_671b_ascend.sh (a 512-NPU recipe): the script itself, unchanged but for
  its knobs, on 4 CPU processes (torchrun, gloo) with a tiny DeepSeek-V3 config.json, a tiny HuggingFace
  tokenizer and data preprocessed by tools/preprocess_data.py: TP 2 + SP, PP 2 with the first / last stage
  sizes, EP 2 x ETP 1, the distributed optimizer with overlap, full recompute under gradient-accumulation fusion
  (the setting that used to crash at the first backward), bf16, MTP; 2 iterations, a checkpoint.
* pretrain_scripts/pretrain_deepseek_v2_lite_8npu.sh then posttrain_scripts/sft_deepseek_v2_lite_8npu.sh (8-NPU
  recipes) on 2 CPU processes (EP 2, selective recompute), the SFT run loading the pretraining run's checkpoint
  and packing instruction data preprocessed with --sft.
* posttrain_scripts/posttrain_deepseek_v4_pro_1024x910c.sh: its flags parse and build the configs and the layout
  (SHOW_LAYOUT=1, shrunk); it cannot train until the trainer builds V4 models. The V3 recipe's full-size layout
  (512 ranks, the 61-layer config) is checked the same way.
* pretrain_scripts/quickstart.sh and posttrain_scripts/quickstart_sft.sh run in tests/test_quickstart.py.

Cost: about 20 s per torchrun world on 2 cores (process start-up dominates).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _tiny_config(path, model_type):
    from megatron_ascend.config import ModelConfig
    v2 = model_type == "deepseek_v2"
    cfg = ModelConfig(model_type=model_type, vocab_size=512, hidden_size=32, intermediate_size=64,
                      moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
                      q_lora_rank=None if v2 else 16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                      v_head_dim=8, n_routed_experts=4, n_shared_experts=2 if v2 else 1, num_experts_per_tok=2,
                      n_group=1, topk_group=1, topk_method="greedy" if v2 else "noaux_tc",
                      scoring_func="softmax" if v2 else "sigmoid", norm_topk_prob=not v2,
                      routed_scaling_factor=1.0 if v2 else 2.5, first_k_dense_replace=1,
                      max_position_embeddings=128, init_method_std=0.02)
    with open(path, "w") as f:
        json.dump(cfg.to_hf_dict(), f)
    return path


def _tiny_hf_tokenizer(directory, corpus):
    """A 512-token BPE tokenizer.json (+ tokenizer_config.json naming its EOS) trained on ``corpus``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "</s>", "<s>"]))
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "</s>", "bos_token": "<s>"}, f)
    return directory


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny configs, tokenizer, pretraining and SFT data (preprocessed by the project's own tool)."""
    from megatron_ascend.data.preprocess import main as preprocess
    root = tmp_path_factory.mktemp("scripts")
    texts = [f"def function_{i}(x):\n    return x * {i} + {i % 7}  # line {i}\n" * 2 for i in range(1200)]  # 1 valid doc
    tok = _tiny_hf_tokenizer(str(root / "tokenizer"), texts)
    with open(root / "corpus.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    with open(root / "sft.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"instruction": f"Repeat {i}", "output": f"{i} {i}"}) + "\n")
    common = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok, "--no-progress"]
    assert preprocess(["--input", str(root / "corpus.jsonl"), "--output-prefix", str(root / "corpus"),
                       "--append-eod"] + common) == 0
    assert preprocess(["--sft", "--input", str(root / "sft.jsonl"), "--output-prefix", str(root / "sft"),
                       "--prompt-type", "deepseek"] + common) == 0
    return {"root": root, "tok": tok, "data": str(root / "corpus_text_document"), "sft": str(root / "sft"),
            "v3": _tiny_config(str(root / "v3.json"), "deepseek_v3"),
            "v2": _tiny_config(str(root / "v2.json"), "deepseek_v2")}


def _run(script, env, timeout=400):
    full = dict(os.environ, DEVICE_TYPE="cpu", NNODES="1", NODE_RANK="0", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=_free_port(), OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    full.update(env)
    r = subprocess.run(["bash", script], cwd=REPO, env=full, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{script} exited {r.returncode}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def _saved(ckpt_dir) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, "latest_checkpointed_iteration.txt"))


def test_v3_671b_ascend_recipe_trains_shrunk_on_4_cpu_processes(assets):
    root = assets["root"]
    out = _run("pretrain_scripts/pretrain_deepseek_v3_671b_ascend.sh", dict(
        DEVICES_PER_NODE="4", HF_CONFIG=assets["v3"], TOKENIZER_PATH=assets["tok"], DATA_PATH=assets["data"],
        CKPT_SAVE_DIR=str(root / "v3_ckpt"), LOG_DIR=str(root), TP="2", PP="2", EP="2", FIRST_STAGE_LAYERS="1",
        LAST_STAGE_LAYERS="2", SEQ_LEN="32", MBS="1", GBS="2", TRAIN_ITERS="2", EVAL_INTERVAL="2", EVAL_ITERS="1",
        SAVE_INTERVAL="2", LR_WARMUP_ITERS="1"))
    assert "iteration        2/       2" in out and "validation loss at iteration 2" in out, out[-3000:]
    assert "layout tp 2 pp 2 (vp 1) ep 2 dp 1" in out
    assert _saved(root / "v3_ckpt")
    assert os.path.isfile(root / "logs_deepseek_v3_671b_node0.log")


def test_v2_lite_pretrain_then_sft_recipes_run_shrunk_on_2_cpu_processes(assets):
    root = assets["root"]
    shrink = dict(DEVICES_PER_NODE="2", HF_CONFIG=assets["v2"], TOKENIZER_PATH=assets["tok"], LOG_DIR=str(root),
                  EP="2", SEQ_LEN="32", MBS="1", GBS="4", TRAIN_ITERS="2", EVAL_INTERVAL="2", EVAL_ITERS="1",
                  SAVE_INTERVAL="2", LOG_INTERVAL="1", LR_WARMUP_ITERS="1")
    out = _run("pretrain_scripts/pretrain_deepseek_v2_lite_8npu.sh",
               dict(shrink, DATA_PATH=assets["data"], CKPT_SAVE_DIR=str(root / "v2_ckpt")))
    assert "iteration        2/       2" in out and "ep 2 dp 2" in out, out[-3000:]
    assert _saved(root / "v2_ckpt")
    out = _run("posttrain_scripts/sft_deepseek_v2_lite_8npu.sh",
               dict(shrink, DATA_PATH=assets["sft"], CKPT_LOAD_DIR=str(root / "v2_ckpt"),
                    CKPT_SAVE_DIR=str(root / "v2_sft"), SEQ_LEN="128"))  # a templated conversation fits
    assert "training sft: iterations 0 -> 2" in out and "loaded checkpoint" in out, out[-3000:]
    assert "iteration        2/       2" in out
    assert _saved(root / "v2_sft")


def test_v4_pro_and_full_size_v3_recipes_parse_and_lay_out(assets, tmp_path):
    """V4-Pro: the recipe's flags parse and build the configs and the layout (SHOW_LAYOUT=1) at a shrunk size
    (a tiny V4 with sliding, CSA and HCA layers); V3's full-size layout (512 ranks, 61 layers + MTP) too."""
    from megatron_ascend.config import ModelConfig
    v4 = ModelConfig(model_type="deepseek_v4", vocab_size=512, hidden_size=32, intermediate_size=64,
                     moe_intermediate_size=16, num_hidden_layers=5, num_attention_heads=4, q_lora_rank=16,
                     kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
                     num_experts_per_tok=2, first_k_dense_replace=0, hc_mult=2, head_dim=16, o_groups=2,
                     o_lora_rank=8, sliding_window=8, compress_ratios=[0, 4, 8, 4, 8], index_n_heads=2,
                     index_head_dim=8, index_topk=4, num_hash_layers=1, max_position_embeddings=128)
    with open(tmp_path / "v4.json", "w") as f:
        json.dump(v4.to_hf_dict(), f)
    out = _run("posttrain_scripts/posttrain_deepseek_v4_pro_1024x910c.sh", dict(
        SHOW_LAYOUT="1", DEVICES_PER_NODE="8", HF_CONFIG=str(tmp_path / "v4.json"), LOG_DIR=str(tmp_path),
        CKPT_LOAD_DIR=str(tmp_path / "none"), TP="1", PP="4", EP="2", EXPERT_TP="1", FIRST_STAGE_LAYERS="2",
        LAST_STAGE_LAYERS="1", SEQ_LEN="64", GBS="8"))
    assert "world 8: tp 1 cp 1 pp 4 dp 2" in out and "placement: pp 4 x vp 1, 5 layers + 1 MTP" in out, out
    # V4-Flash: its TP + SP, EP, selective recompute with mhc, shrunk to 16 ranks
    out = _run("posttrain_scripts/posttrain_deepseek_v4_flash_256x910c.sh", dict(
        SHOW_LAYOUT="1", NNODES="2", DEVICES_PER_NODE="8", HF_CONFIG=str(tmp_path / "v4.json"), LOG_DIR=str(tmp_path),
        CKPT_LOAD_DIR=str(tmp_path / "none"), TP="2", PP="2", EP="4", FIRST_STAGE_LAYERS="3", LAST_STAGE_LAYERS="2",
        SEQ_LEN="64", GBS="32"))
    assert "world 16: tp 2 cp 1 pp 2 dp 4" in out and "placement: pp 2 x vp 1, 5 layers + 1 MTP" in out, out
    with open(tmp_path / "v3_full.json", "w") as f:
        json.dump(ModelConfig().to_hf_dict(), f)  # the released DeepSeek-V3 sizes (61 layers, 256 experts)
    out = _run("pretrain_scripts/pretrain_deepseek_v3_671b_ascend.sh", dict(
        SHOW_LAYOUT="1", NNODES="64", DEVICES_PER_NODE="8", HF_CONFIG=str(tmp_path / "v3_full.json"),
        TOKENIZER_PATH=assets["tok"], LOG_DIR=str(tmp_path)))
    assert "world 512: tp 4 cp 1 pp 8 dp 16" in out and "pp   7: 55-60,MTP,L" in out, out[-3000:]
