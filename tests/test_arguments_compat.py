"""Megatron-LM / MindSpeed-LLM flags: every flag of the public DeepSeek scripts is ours or classified in
arguments_compat's table; aliases change our settings as the foreign flag means; flags accepted without effect
are named in the start-up line; refused flags and contradicting values are one error; docs/MIGRATING.md is the
table; no parser takes abbreviations; model families and Megatron-style descriptions get their own defaults."""
import argparse
import ast
import glob
import math
import os
import subprocess
import sys

import pytest

from megatron_ascend import arguments_compat as compat
from megatron_ascend.arguments import build_configs, build_parser, parse_args
from megatron_ascend.config import ConfigError, ModelConfig
from megatron_ascend.training.entry import add_posttrain_args, parse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS_FILE = os.path.join(REPO, "tests", "public_scripts", "public_flags.txt")
# flags of the public scripts that other parts of the library define natively (helpers "trainer" / "reliab")
OWNED_ELSEWHERE = {"--noop-layers", "--num-layer-list", "--pipeline-model-parallel-layout",
                   "--no-check-for-nan-in-loss-and-grad"}

TINY = ("--num-layers 3 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --kv-lora-rank 16 "
        "--qk-head-dim 8 --qk-pos-emb-head-dim 4 --v-head-dim 8 --num-experts 4 --moe-ffn-hidden-size 16 "
        "--moe-router-topk 2 --first-k-dense-replace 1 --vocab-size 128 --make-vocab-size-divisible-by 1 "
        "--max-position-embeddings 64 --seq-length 16 --mock-data").split()


def _public_flags():
    out = []
    for line in open(FLAGS_FILE):
        if line.startswith("#") or not line.strip():
            continue
        cmd, flag, _ = line.split()
        out.append((cmd, flag))
    return out


def _native_train_flags():
    p = build_parser(extra_args=add_posttrain_args)
    return {o for a in p._actions if not a.dest.startswith("compat_") for o in a.option_strings}


def test_every_public_flag_is_ours_or_classified(capsys):
    native = _native_train_flags()
    from megatron_ascend.data.preprocess import get_parser
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import convert_ckpt
    finally:
        sys.path.pop(0)
    tools = {"preprocess": set(get_parser()._option_string_actions),
             "convert": set(convert_ckpt.build_parser()._option_string_actions)}
    counts = {}
    missing = []
    for cmd, flag in _public_flags():
        if cmd == "train":
            f = compat.lookup(flag)
            kind = "ours" if flag in native else (f.kind if f else None)
            if kind is None and flag not in OWNED_ELSEWHERE:
                missing.append(flag)
            counts[kind or "elsewhere"] = counts.get(kind or "elsewhere", 0) + 1
        elif flag not in tools[cmd]:
            missing.append(f"{cmd} {flag}")
    assert not missing, missing
    # no flag is both ours and in the table (a native flag added later must leave the table)
    table = {n for f in compat.TRAIN_FLAGS for n in f.names}
    assert not (table & native), sorted(table & native)
    with capsys.disabled():
        print(f"\npublic training flags: {counts}")


def test_migrating_md_is_generated_from_the_table():
    with open(os.path.join(REPO, "docs", "MIGRATING.md"), encoding="utf-8") as f:
        assert f.read() == compat.migrating_markdown(), \
            "docs/MIGRATING.md is stale: python -m megatron_ascend.arguments_compat --write docs/MIGRATING.md"
    for f in compat.TRAIN_FLAGS + compat.PREPROCESS_FLAGS + compat.CONVERT_FLAGS:
        assert f.kind in (compat.ALIAS, compat.NO_EFFECT, compat.REFUSED) and f.means
        if f.kind == compat.REFUSED:
            assert f.instead, f.name  # the nearest supported option
        if f.kind == compat.NO_EFFECT:
            assert f.group in compat.GROUPS, f.name
            assert f.group != compat.NOT_BUILT or f.instead, f.name  # what runs instead


def test_no_parser_takes_abbreviations():
    """Every argparse parser in the package, tools and benches is built with allow_abbrev=False (before, tools/
    convert_ckpt.py read MindSpeed's --num-layers 64 as --num-layers-per-virtual-pipeline-stage 64)."""
    files = (glob.glob(os.path.join(REPO, "megatron_ascend", "**", "*.py"), recursive=True)
             + glob.glob(os.path.join(REPO, "tools", "*.py")) + glob.glob(os.path.join(REPO, "bench", "*.py")))
    bad = []
    for path in files:
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == \
                    "ArgumentParser":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("allow_abbrev"), ast.Constant) and kw["allow_abbrev"].value is False):
                    bad.append(f"{os.path.relpath(path, REPO)}:{node.lineno}")
    assert not bad, bad
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import convert_ckpt
    finally:
        sys.path.pop(0)
    a = convert_ckpt.build_parser().parse_args("--load-dir a --save-dir b --num-layers 64".split())
    assert a.num_layers == 64 and a.num_layers_per_virtual_pipeline_stage is None
    with pytest.raises(SystemExit):
        parse_args(TINY + ["--train-iter", "3"])  # an abbreviation of --train-iters


def test_aliases_write_our_settings(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    a = parse_args(TINY + "--tokenizer-name-or-path /tok --tokenizer-type PretrainedFromHF --local-rank=1 "
                          "--distributed-timeout-minutes 7 --rotary-scaling-factor 40 --mscale 0.707 "
                          "--mscale-all-dim 0.707 --beta-fast 16 --beta-slow 2 --rope-scaling-type yarn "
                          "--moe-token-dispatcher-type alltoall_seq --train-iters 2".split())
    assert (a.tokenizer_model, a.tokenizer_type, a.moe_token_dispatcher_type) == ("/tok", "HuggingFaceTokenizer",
                                                                                  "alltoall")
    assert os.environ["LOCAL_RANK"] == "1" and a.distributed_timeout_minutes == 7.0
    m = build_configs(a, 1)[0]
    assert m.rope_scaling.factor == 40 and m.rope_scaling.mscale == 0.707 and m.rope_scaling.mscale_all_dim == 0.707
    assert (m.rope_scaling.beta_fast, m.rope_scaling.beta_slow) == (16, 2)
    with pytest.raises(ConfigError, match="LOCAL_RANK"):
        parse_args(TINY + ["--local_rank=0"])  # disagrees with the environment torch.distributed.launch set
    with pytest.raises(ConfigError, match="give one"):
        parse_args(TINY + "--tokenizer-model /a --tokenizer-name-or-path /b".split())
    # --padded-vocab-size is the model's rows; MindSpeed's --vocab-size beside it is the unpadded size
    m = build_configs(parse_args(TINY + "--vocab-size 100 --padded-vocab-size 128 --train-iters 1".split()), 1)[0]
    assert m.vocab_size == 128
    with pytest.raises(ConfigError, match="exceeds --padded-vocab-size"):
        build_configs(parse_args(TINY + "--vocab-size 200 --padded-vocab-size 128 --train-iters 1".split()), 1)


def _megatron_lr(it, lr, init, warm, decay, min_lr, gbs):
    """Megatron's OptimizerParamScheduler.get_lr in samples, cosine (written from its definition)."""
    n = it * gbs
    if warm > 0 and n <= warm:
        return init + (lr - init) * n / warm
    if n > decay:
        return min_lr
    r = (n - warm) / (decay - warm)
    return min_lr + 0.5 * (math.cos(math.pi * r) + 1.0) * (lr - min_lr)


def test_sample_based_schedule_equals_megatron():
    from megatron_ascend.optimizer.lr_scheduler import OptimizerParamScheduler

    class Opt:
        param_groups = [{}]
    a = parse_args(TINY + "--global-batch-size 24 --micro-batch-size 1 --train-samples 1000 --lr-warmup-samples 100 "
                          "--lr-decay-samples 900 --lr 1e-3 --min-lr 1e-5 --lr-warmup-init 1e-4".split())
    _, _, opt, train, _ = build_configs(a, 1)
    assert train.train_iters == 1000 // 24 and train.train_samples == 1000
    s = OptimizerParamScheduler(Opt(), opt, train.train_iters)
    for it in range(0, train.train_iters + 1):
        want = _megatron_lr(it, 1e-3, 1e-4, 100, 900, 1e-5, 24)
        assert s.get_lr(it) == pytest.approx(want, rel=1e-12, abs=1e-18), it
    # warm-up as a fraction of the decay length, counted in iterations
    a = parse_args(TINY + "--train-iters 40 --lr-decay-iters 30 --lr-warmup-fraction 0.1 --lr 1e-3".split())
    opt = build_configs(a, 1)[2]
    assert opt.lr_warmup_iters == pytest.approx(3.0)
    for bad, msg in (("--train-samples 100 --train-iters 3", "give one"),
                     ("--train-iters 3 --lr-warmup-samples 10", "need --train-samples"),
                     ("--train-samples 100 --lr-warmup-iters 3", "--lr-warmup-samples"),
                     ("--train-iters 3 --lr-warmup-fraction 0.1 --lr-warmup-iters 1", "give one"),
                     ("--train-samples 2 --global-batch-size 4", "less than one global batch")):
        with pytest.raises(ConfigError, match=msg):
            build_configs(parse_args(TINY + bad.split()), 1)


def test_no_effect_flags_named_in_one_startup_line(capsys, monkeypatch):
    from megatron_ascend import pretrain
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = TINY + ("--train-iters 1 --use-flash-attn --swiglu --normalization RMSNorm --schedules-method dualpipev "
                   "--swap-optimizer --moe-grouped-gemm --sequence-parallel --show-layout").split()
    assert pretrain.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [l for l in out if l.startswith("accepted, no effect here:")]
    assert len(lines) == 1
    line = lines[0]
    for f in ("--use-flash-attn", "--swiglu", "--normalization", "--moe-grouped-gemm", "--schedules-method",
              "--swap-optimizer"):
        assert f in line, f
    assert "1F1B" in line and "more device memory" in line  # what runs instead, and its memory cost
    # Megatron turns --sequence-parallel off at TP 1 with a warning (it was an error here before)
    assert any(l.startswith("note: --sequence-parallel turned off") for l in out)
    assert build_configs(parse_args(TINY + ["--sequence-parallel", "--train-iters", "1"]), 1)[1].sequence_parallel \
        is False


@pytest.mark.parametrize("flag,msg", [
    ("--normalization LayerNorm", "--normalization LayerNorm contradicts"),
    ("--position-embedding-type learned_absolute", "learned_absolute contradicts"),
    ("--hidden-dropout 0.1", "--hidden-dropout 0.1 contradicts"),
    ("--moe-router-dtype fp64", "--moe-router-dtype fp64 contradicts"),
    ("--lora-r 8", "--lora-r is not supported (LoRA is not built); nearest: full-parameter"),
    ("--moe-tp-extend-ep", "nearest: --expert-tensor-parallel-size 1"),
    ("--hc-mult 4", "nearest: --model-config"),
    ("--rope-scaling-type linear", "'linear' is not supported"),
    ("--moe-router-load-balancing-type sinkhorn", "sinkhorn is not built"),
    ("--model-type-hf llama2", "not a DeepSeek model"),
    ("--moe-layer-freq __import__('os').system('true')", "neither an integer nor a list"),
])
def test_refused_and_contradicting_values_are_one_line_exit_2(flag, msg, capsys):
    from megatron_ascend import pretrain
    rc = pretrain.main(TINY + ["--train-iters", "1"] + flag.split())
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and msg in err[-1], err


def test_moe_layer_freq_list_form_without_eval():
    assert compat.parse_moe_layer_freq("([0]*3+[1]*58)") == [0] * 3 + [1] * 58
    assert compat.parse_moe_layer_freq("[0,1,0,1]") == [0, 1, 0, 1]
    assert compat.parse_moe_layer_freq("2") == 2
    assert compat.moe_pattern_to_ours([0] * 3 + [1] * 58, 61) == (3, 1)
    assert compat.moe_pattern_to_ours([1, 0, 1, 0], 4) == (0, 2)
    with pytest.raises(ConfigError, match="lists 5 layers"):
        compat.moe_pattern_to_ours([0, 1, 1, 1, 1], 4)
    with pytest.raises(ConfigError, match="cannot be said"):
        compat.moe_pattern_to_ours([0, 1, 0, 0, 1, 1], 6)
    for evil in ("[0]*10**9", "([0]+[1])*2", "[2]", "(lambda: 1)()"):
        with pytest.raises(argparse.ArgumentTypeError):
            compat.parse_moe_layer_freq(evil)
    m = build_configs(parse_args(TINY + ["--moe-layer-freq", "([0]*1+[1]*2)", "--train-iters", "1"]), 1)[0]
    assert (m.first_k_dense_replace, m.moe_layer_freq, m.num_moe_layers) == (1, 1, 2)


# DeepSeek-V2-Lite's config.json on the hub (the values a V2-Lite script must train)
V2_LITE = dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
               moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None,
               kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
               n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1, topk_method="greedy",
               scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0, first_k_dense_replace=1,
               moe_layer_freq=1, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=163840,
               tie_word_embeddings=False,
               rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                                 beta_slow=1, mscale=0.707, mscale_all_dim=0.707))
ARCH = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
        "n_shared_experts", "num_experts_per_tok", "topk_method", "scoring_func", "norm_topk_prob",
        "routed_scaling_factor", "first_k_dense_replace", "moe_layer_freq", "rms_norm_eps", "tie_word_embeddings",
        "rope_scaling", "num_nextn_predict_layers", "model_type")

# MindSpeed-LLM's deepseek2_lite pretrain flags (examples/mcore/deepseek2_lite/pretrain_deepseek2_lite_16b_ptd_8p.sh)
MS_V2_LITE = ("--multi-latent-attention --qk-pos-emb-head-dim 64 --qk-head-dim 128 --kv-lora-rank 512 "
              "--v-head-dim 128 --qk-layernorm --moe-grouped-gemm --moe-token-dispatcher-type alltoall_seq "
              "--first-k-dense-replace 1 --moe-layer-freq 1 --n-shared-experts 2 --num-experts 64 "
              "--moe-router-topk 6 --moe-ffn-hidden-size 1408 --moe-router-load-balancing-type pai_megatron_aux_loss "
              "--moe-router-group-topk 1 --moe-router-num-groups 8 --moe-aux-loss-coeff 0.01 "
              "--moe-router-topk-scaling-factor 1.0 --seq-aux --beta-fast 32 --beta-slow 1 --rope-scaling-factor 40 "
              "--rope-scaling-mscale 0.707 --rope-scaling-mscale-all-dim 0.707 "
              "--rope-scaling-original-max-position-embeddings 4096 --rope-scaling-type yarn --num-layers 27 "
              "--hidden-size 2048 --ffn-hidden-size 10944 --num-attention-heads 16 --max-position-embeddings 163840 "
              "--vocab-size 102400 --padded-vocab-size 102400 --untie-embeddings-and-output-weights --norm-epsilon 1e-6 "
              "--model-type-hf deepseek2-lite --position-embedding-type rope --normalization RMSNorm --swiglu")
# Megatron-LM's examples/post_training/modelopt/conf/deepseek-ai/DeepSeek-V2-Lite.sh MODEL_ARGS (model part)
MLM_V2_LITE = ("--untie-embeddings-and-output-weights --position-embedding-type rope --no-rope-fusion "
               "--normalization RMSNorm --norm-epsilon 1e-6 --swiglu --num-layers 27 --hidden-size 2048 "
               "--ffn-hidden-size 10944 --num-attention-heads 16 --kv-channels 16 --multi-latent-attention "
               "--kv-lora-rank 512 --v-head-dim 128 --qk-head-dim 128 --qk-layernorm --qk-pos-emb-head-dim 64 "
               "--num-experts 64 --moe-layer-freq ([0]+[1]*26) --moe-ffn-hidden-size 1408 --moe-grouped-gemm "
               "--moe-router-score-function softmax --moe-router-topk 6 --moe-router-topk-scaling-factor 1.0 "
               "--moe-router-pre-softmax --moe-shared-expert-intermediate-size 2816 --moe-aux-loss-coeff 1e-3 "
               "--moe-token-dispatcher-type alltoall --moe-token-drop-policy probs "
               "--moe-router-load-balancing-type seq_aux_loss --seq-length 1024 --max-position-embeddings 163840 "
               "--rotary-percent 1.0 --rotary-base 10000 --rotary-scaling-factor 40 --mscale 0.707 "
               "--mscale-all-dim 0.707 --vocab-size 102400")


@pytest.mark.parametrize("argv", [MS_V2_LITE, MLM_V2_LITE, "--model-type deepseek_v2"],
                         ids=["mindspeed", "megatron", "model-type"])
def test_v2_lite_given_as_flags_trains_v2_lite(argv):
    """Before: V3's q-LoRA 1536, sigmoid + noaux_tc + bias and normalised top-k were trained silently."""
    got = build_configs(parse_args(argv.split() + ["--mock-data", "--train-iters", "1"]), 8)[0]
    want = ModelConfig(**V2_LITE)
    for k in ARCH:
        assert getattr(got, k) == getattr(want, k), (k, getattr(got, k), getattr(want, k))
    assert got.moe_router_load_balancing_type == ("aux_loss" if argv == MS_V2_LITE else "seq_aux_loss")


def test_mindspeed_v3_router_and_megatron_routing_rules():
    v3 = ("--multi-latent-attention --q-lora-rank 32 --kv-lora-rank 16 --qk-head-dim 8 --qk-pos-emb-head-dim 4 "
          "--v-head-dim 8 --num-layers 3 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 "
          "--num-experts 8 --moe-ffn-hidden-size 16 --moe-router-topk 4 --n-shared-experts 1 --first-k-dense-replace 1 "
          "--moe-router-load-balancing-type none --moe-router-num-groups 4 --moe-router-group-topk 2 "
          "--moe-router-topk-scaling-factor 2.5 --moe-aux-loss-coeff 1e-4 --seq-aux --norm-topk-prob "
          "--moe-router-score-function sigmoid --moe-router-enable-expert-bias --vocab-size 64 --mock-data "
          "--train-iters 1 --seq-length 16 --untie-embeddings-and-output-weights").split()
    m = build_configs(parse_args(v3), 1)[0]
    assert (m.topk_method, m.scoring_func, m.norm_topk_prob, m.routed_scaling_factor) == ("noaux_tc", "sigmoid",
                                                                                          True, 2.5)
    assert (m.moe_router_load_balancing_type, m.aux_loss_alpha, m.n_group, m.topk_group) == ("seq_aux_loss", 1e-4,
                                                                                             4, 2)
    # Megatron scores a group by its top-(k / group-topk) experts; ours by the top-2 (noaux_tc): refused if unequal
    with pytest.raises(ConfigError, match="top-1 experts"):
        build_configs(parse_args(v3 + ["--moe-router-group-topk", "4"]), 1)
    # softmax without pre-softmax normalises the top-k; with a scaling factor ours would differ: refused
    base = [a for a in v3 if a not in ("--moe-router-enable-expert-bias", "--norm-topk-prob")]
    base[base.index("sigmoid")] = "softmax"
    base[base.index("--moe-router-num-groups") + 1] = "1"
    with pytest.raises(ConfigError, match="scales the normalised weights"):
        build_configs(parse_args(base), 1)
    m = build_configs(parse_args(base + ["--moe-router-pre-softmax"]), 1)[0]
    assert (m.topk_method, m.norm_topk_prob) == ("greedy", False)
    # Megatron's defaults for a Megatron-style description: tied embeddings, no q-LoRA, eps 1e-5
    bare = ("--multi-latent-attention --num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
            "--vocab-size 64 --mock-data --train-iters 1").split()
    m = build_configs(parse_args(bare), 1)[0]
    assert (m.q_lora_rank, m.tie_word_embeddings, m.rms_norm_eps, m.n_routed_experts, m.intermediate_size,
            m.max_position_embeddings, m.kv_lora_rank) == (None, True, 1e-5, 0, 128, 16, 32)


def test_model_config_file_wins_over_megatron_defaults(tmp_path):
    """With --model-config the file's architecture stands; Megatron-style flags only change what they say."""
    import json
    cfg = ModelConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                      num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                      v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                      first_k_dense_replace=1, vocab_size=64, max_position_embeddings=64)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_hf_dict()))
    m = build_configs(parse_args(f"--model-config {path} --multi-latent-attention --swiglu --mock-data "
                                 f"--train-iters 1 --seq-length 16".split()), 1)[0]
    for k in ("q_lora_rank", "topk_method", "scoring_func", "norm_topk_prob", "routed_scaling_factor",
              "tie_word_embeddings", "rms_norm_eps", "n_shared_experts", "model_type"):
        assert getattr(m, k) == getattr(cfg, k), k


def _convert(argv, capsys):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import convert_ckpt
    finally:
        sys.path.pop(0)
    try:
        convert_ckpt.main(argv)
        rc = 0
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_convert_tool_mindspeed_flags(tmp_path, capsys):
    from tests.test_hf_conversion import build_hf, save_hf
    from megatron_ascend.checkpointing import read_common
    hf = save_hf(build_hf("v3"), str(tmp_path / "hf"), mtp=True)
    base = ["--load-dir", hf, "--moe-grouped-gemm", "--no-progress"]
    # MindSpeed's hf -> mg line, with its layer count including 3 noop layers (4 + 3 = 7)
    rc, out, err = _convert(base + ["--save-dir", str(tmp_path / "mg"), "--load-model-type", "hf",
                                    "--save-model-type", "mg", "--target-tensor-parallel-size", "2",
                                    "--target-pipeline-parallel-size", "2", "--target-expert-parallel-size", "2",
                                    "--model-type-hf", "deepseek3", "--num-layers", "7", "--noop-layers", "4,5,6",
                                    "--mtp-num-layers", "1", "--first-k-dense-replace", "1", "--mla-mm-split"], capsys)
    assert rc == 0, err
    assert "accepted, no effect here: --moe-grouped-gemm --mla-mm-split" in out
    common = read_common(str(tmp_path / "mg" / "release"))
    assert common["converted_for_layout"]["tp"] == 2 and common["model_config"]["num_hidden_layers"] == 4
    # direction from what --load-dir holds (MindSpeed's mcore2hf script names no model types)
    rc, out, err = _convert(["--load-dir", str(tmp_path / "mg"), "--save-dir", str(tmp_path / "back"),
                             "--source-tensor-parallel-size", "2", "--no-progress"], capsys)
    assert rc == 0 and os.path.isfile(tmp_path / "back" / "config.json"), err
    for extra, msg in ((["--num-layers", "9", "--noop-layers", "4,5,6"], "--num-layers 9 disagrees"),
                       (["--model-type-hf", "deepseek2-lite"], "--model-type-hf deepseek2-lite disagrees"),
                       (["--load-model-type", "hf", "--save-model-type", "hf"], "nothing to convert"),
                       (["--quant_type", "bfloat16"], "nearest: --direction hf2ma dequantises")):
        rc, out, err = _convert(base + ["--save-dir", str(tmp_path / "x")] + extra, capsys)
        assert rc == 2 and msg in err.strip().splitlines()[-1], err
