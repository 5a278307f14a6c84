"""The public DeepSeek scripts, shrunk (tests/public_scripts/, each naming its source and commit), run with only
the entry point changed: MindSpeed-LLM's DeepSeek-V3 data_convert scripts make the data from tiny local parquet
files, its pretrain and SFT scripts train from a tiny HuggingFace checkpoint (--enable-hf2mg-convert) with its own
launcher line (python -m torch.distributed.launch $DISTRIBUTED_ARGS), and Megatron-LM's DeepSeek-V2-Lite
configuration trains under torchrun. Everything is local: the tokenizer and the checkpoint are built here."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "tests", "public_scripts")
TRAINER_FLAGS = ("--noop-layers", "--num-layer-list")  # layer placement flags helper "trainer" adds natively


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _hf_v3(out_dir, vocab):
    """A tiny DeepSeek-V3 with the shrunk scripts' sizes (3 layers + 1 MTP layer), saved the hub's way."""
    import transformers as T
    from tests.test_hf_conversion import save_hf
    cfg = T.DeepseekV3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False,
        num_nextn_predict_layers=1,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, beta_fast=32, beta_slow=1,
                             mscale=1.0, mscale_all_dim=1.0, original_max_position_embeddings=4096))
    torch.manual_seed(0)
    model = T.DeepseekV3ForCausalLM(cfg).float()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t) * 0.02 + (1.0 if "norm" in name else 0.0))
    save_hf(model, out_dir, mtp=True)


def _parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    from megatron_ascend.data import tokenizer_training as tt
    from megatron_ascend.data.tokenizer import build_tokenizer
    from tests.test_data_common import stdlib_texts
    root = tmp_path_factory.mktemp("public_scripts")
    texts = stdlib_texts(16, 3000)
    hf = str(root / "model_from_hf" / "deepseek3-hf")
    tt.train_hf_bpe([ln for t in texts for ln in t.split("\n") if ln.strip()], hf, vocab_size=512)
    assert build_tokenizer("HuggingFaceTokenizer", hf).vocab_size == 512  # the scripts' --vocab-size
    _hf_v3(hf, 512)
    _parquet(str(root / "dataset" / "train-00000-of-00042-d964455e17e96d5a.parquet"), [{"text": t} for t in texts])
    _parquet(str(root / "dataset" / "train-00000-of-00001-a09b74b3ef9c3b56.parquet"),
             [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"{2 * i}"} for i in range(24)])
    os.makedirs(root / "logs")
    return root


def _run(script, cwd, timeout=400):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MEGATRON_ASCEND_DIR=REPO, MEGATRON_ASCEND_DEVICE="cpu", OMP_NUM_THREADS="1",
               MASTER_PORT=_free_port(), PYTHONWARNINGS="ignore")
    r = subprocess.run(["bash", os.path.join(SCRIPTS, script)], cwd=str(cwd), env=env, capture_output=True,
                       text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def _data(scratch):
    if not os.path.isfile(scratch / "dataset" / "enwiki_text_document.idx"):
        rc, out = _run("data_convert_deepseek3_pretrain.sh", scratch)
        assert rc == 0 and "wrote" in out, out[-3000:]
    if not os.path.isfile(scratch / "finetune_dataset" / "alpaca_input_ids_document.idx"):
        rc, out = _run("data_convert_deepseek3_instruction.sh", scratch)
        assert rc == 0 and "accepted, no effect here: --overwrite-cache" in out, out[-3000:]


def test_data_convert_and_megatron_v2_lite(scratch):
    _data(scratch)
    rc, out = _run("megatron_deepseek_v2_lite_launch.sh", scratch)
    assert rc == 0, out[-4000:]
    assert "accepted, no effect here:" in out and "--kv-channels" in out and "--moe-grouped-gemm" in out
    assert "note: --sequence-parallel turned off" in out
    assert out.count(" iteration ") >= 2 and "iteration        2/       2" in out, out[-3000:]


def _trainer_flags_native():
    from megatron_ascend.arguments import build_parser
    p = build_parser()
    return all(f in p._option_string_actions and not p._option_string_actions[f].dest.startswith("compat_")
               for f in TRAINER_FLAGS)


@pytest.mark.skipif(not _trainer_flags_native(),
                    reason="needs the layer placement flags (--noop-layers, --num-layer-list) and the recompute x "
                           "gradient-accumulation fusion fix from helper 'trainer' (issue 21)")
@pytest.mark.parametrize("script,ckpt", [("pretrain_deepseek3_671b_4k_ptd.sh", "ckpt_pretrain"),
                                         ("tune_deepseek3_671b_4k_full_ptd.sh", "ckpt_sft")])
def test_mindspeed_deepseek3_scripts(scratch, script, ckpt):
    _data(scratch)
    rc, out = _run(script, scratch)
    assert rc == 0, out[-4000:]
    assert "accepted, no effect here:" in out and "--use-flash-attn" in out
    assert "converting the HuggingFace checkpoint" in out or os.path.isdir(
        scratch / "model_from_hf" / "deepseek3-hf" / "megatron_ascend_hf2ma")
    assert "iteration        2/       2" in out, out[-3000:]
    assert open(scratch / ckpt / "latest_checkpointed_iteration.txt").read().strip() == "2"
    common = json.load(open(scratch / ckpt / "iter_0000002" / "common.json"))
    assert common["has_optimizer"] is False and common["has_rng"] is False  # --no-save-optim --no-save-rng
