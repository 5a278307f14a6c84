"""HF <-> our checkpoint: bitwise round trips for tiny DeepSeek V3 (with a hub-style MTP layer), V2-Lite
and V3.2 saved by transformers in several shards, at the layouts (T, P, E) in {(1,1,1), (2,2,2), (1,2,4),
(2,1,4)}; transformers loads the exported directory and gives the original logits; FP8 block
dequantisation equals a per-block reference; clear errors for a missing shard, a wrong shape, an unknown key
and a layout that does not divide the model."""
import json
import os
import shutil

import pytest
import torch

LAYOUTS = [(1, 1, 1), (2, 2, 2), (1, 2, 4), (2, 1, 4)]
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 128}


def tiny_kwargs(aligned=False):
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
              first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
              num_experts_per_tok=2, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
              max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if aligned:  # 128-aligned variant for FP8 blocks (deepseek_architecture.md 4.2)
        kw.update(hidden_size=256, intermediate_size=256, moe_intermediate_size=128, kv_lora_rank=128)
    return kw


def build_hf(kind, aligned=False, seed=0):
    import transformers as T
    kw = tiny_kwargs(aligned)
    if kind == "v3":
        cfg = T.DeepseekV3Config(**kw, q_lora_rank=128 if aligned else 32, n_shared_experts=1, n_group=2,
                                 topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                                 num_nextn_predict_layers=1, rope_parameters=dict(YARN))
        cls = T.DeepseekV3ForCausalLM
    elif kind == "v2":
        cfg = T.DeepseekV2Config(**kw, q_lora_rank=None, n_shared_experts=2, topk_method="greedy",
                                 norm_topk_prob=False, routed_scaling_factor=1.0,
                                 rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707))
        cls = T.DeepseekV2ForCausalLM
    elif kind == "v32":
        cfg = T.DeepseekV32Config(**kw, q_lora_rank=32, n_shared_experts=1, n_group=2, topk_group=1,
                                  routed_scaling_factor=2.5, norm_topk_prob=True, index_n_heads=4,
                                  index_head_dim=16, index_topk=4, rope_parameters=dict(YARN))
        cls = T.DeepseekV32ForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    with torch.no_grad():  # every tensor random (norms, biases too) so a swapped mapping cannot hide
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t) * 0.05 + (1.0 if "norm" in name else 0.0))
    return model


def save_hf(model, d, mtp=False):
    """save_pretrained in several shards; mtp=True appends a hub-style MTP layer (model.layers.{L}.*)."""
    from safetensors.torch import save_file
    model.save_pretrained(d, max_shard_size="60KB")
    if mtp:
        from megatron_ascend.checkpointing.hf import expected_tensors
        from megatron_ascend.config import ModelConfig
        from megatron_ascend.models.deepseek.hf_names import hf_names_for
        cfg = ModelConfig.from_hf_dict(json.load(open(os.path.join(d, "config.json"))))
        g = torch.Generator().manual_seed(5)
        extra = {}
        for ma, shape in expected_tensors(cfg).items():
            if not ma.startswith("mtp."):
                continue
            names = hf_names_for(ma, cfg)
            if ".mlp.experts." in ma:
                for hn in names[1:]:
                    extra[hn] = torch.randn(shape[1:], generator=g) * 0.05
            else:
                extra[names[0]] = torch.randn(shape, generator=g) * 0.05
        sd = model.state_dict()
        L = cfg.num_hidden_layers
        extra[f"model.layers.{L}.embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
        extra[f"model.layers.{L}.shared_head.head.weight"] = sd["lm_head.weight"].clone()
        save_file(extra, os.path.join(d, "model-mtp.safetensors"), metadata={"format": "pt"})
        idx_path = os.path.join(d, "model.safetensors.index.json")
        idx = json.load(open(idx_path))
        idx["weight_map"].update({k: "model-mtp.safetensors" for k in extra})
        json.dump(idx, open(idx_path, "w"))
    return d


def read_dir(d):
    from safetensors import safe_open
    idx = os.path.join(d, "model.safetensors.index.json")
    wm = json.load(open(idx))["weight_map"] if os.path.isfile(idx) else None
    files = sorted(set(wm.values())) if wm else ["model.safetensors"]
    out = {}
    for fn in files:
        with safe_open(os.path.join(d, fn), "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def assert_bitwise(a, b):
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))[:6]
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for kind in ("v3", "v2", "v32"):
        model = build_hf(kind)
        dirs[kind] = save_hf(model, str(root / kind), mtp=(kind == "v3"))
        dirs[kind + "_model"] = model
    return dirs


@pytest.mark.parametrize("kind,layouts", [("v3", LAYOUTS), ("v2", [(2, 2, 2)]), ("v32", [(2, 1, 4)])])
def test_round_trip_bitwise_and_transformers_loads_export(hf_dirs, tmp_path, kind, layouts):
    from megatron_ascend.checkpointing import read_common
    from megatron_ascend.checkpointing.hf import convert_hf_to_ma, convert_ma_to_hf
    src = hf_dirs[kind]
    original = read_dir(src)
    assert len(json.load(open(os.path.join(src, "model.safetensors.index.json")))["weight_map"]) == len(original)
    for t, p, e in layouts:
        ma = str(tmp_path / f"ma_{t}{p}{e}")
        rep = convert_hf_to_ma(src, ma, t, p, e, progress=False)
        assert not rep["notes"], rep["notes"]
        common = read_common(os.path.join(ma, "release"))
        assert common["converted_for_layout"] == {"tp": t, "pp": p, "ep": e, "vp": None}
        assert open(os.path.join(ma, "latest_checkpointed_iteration.txt")).read() == "release"
        back = str(tmp_path / f"back_{t}{p}{e}")
        out = convert_ma_to_hf(ma, back, max_shard_bytes=60_000, progress=False)
        assert out["shards"] > 1 and os.path.isfile(os.path.join(back, "model.safetensors.index.json"))
        assert_bitwise(original, read_dir(back))
    # transformers loads the exported directory (config.json from ModelConfig.to_hf_dict) with equal logits
    import transformers
    ref = hf_dirs[kind + "_model"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ref(ids).logits, loaded(ids).logits
    assert torch.equal(a, b), (a - b).abs().max()


def test_workers_and_save_dtype(hf_dirs, tmp_path):
    from megatron_ascend.checkpointing.dcp_io import tensor_index
    from megatron_ascend.checkpointing.hf import convert_hf_to_ma, convert_ma_to_hf
    src = hf_dirs["v3"]
    ma = str(tmp_path / "ma")
    rep = convert_hf_to_ma(src, ma, 2, 2, 2, workers=2, save_dtype="bf16", progress=False)
    assert rep["largest_tensor_bytes"] < rep["bytes"]
    idx = tensor_index(os.path.join(ma, "release"))
    assert idx["model.layers.1.mlp.experts.gate_proj"][1] == torch.bfloat16
    assert idx["model.layers.1.mlp.gate.e_score_correction_bias"][1] == torch.float32  # the router bias stays fp32
    back = str(tmp_path / "back")
    convert_ma_to_hf(ma, back, save_dtype="fp32", progress=False)
    original, got = read_dir(src), read_dir(back)
    assert sorted(original) == sorted(got)
    for k in original:
        want = original[k] if "e_score_correction_bias" in k else original[k].to(torch.bfloat16).float()
        assert torch.equal(got[k], want), k


def test_fp8_block_dequantisation_matches_reference(tmp_path):
    """Quantise a 128-aligned tiny V3 to e4m3 blocks ourselves; the converter's dequantised weights equal a
    block-by-block reference (fp32 and bf16 output; plain and ue8m0 scales; non-multiple-of-128 edges)."""
    from safetensors.torch import save_file
    from megatron_ascend.checkpointing.dcp_io import Chunk, read_chunks, tensor_index
    from megatron_ascend.checkpointing.fp8 import quantize_blocks
    from megatron_ascend.checkpointing.hf import convert_hf_to_ma
    model = build_hf("v3", aligned=True, seed=3)
    src = str(tmp_path / "bf")
    model.save_pretrained(src, max_shard_size="2MB")
    tensors = read_dir(src)
    cfg = json.load(open(os.path.join(src, "config.json")))
    for ue8m0 in (False, True):
        quant, refs = {}, {}
        for k, t in tensors.items():
            quantised = (t.dim() == 2 and ("self_attn." in k or ".mlp." in k) and not k.endswith("mlp.gate.weight"))
            if not quantised:
                quant[k] = t
                continue
            q, s = quantize_blocks(t, ue8m0=ue8m0)
            quant[k], quant[k + "_scale_inv"] = q, s
            ref = torch.empty(t.shape, dtype=torch.float32)  # reference: one block at a time
            for i in range(s.shape[0]):
                for j in range(s.shape[1]):
                    blk = (slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1)))
                    ref[blk] = q[blk].to(torch.float32) * s[i, j]
            refs[k] = ref
        assert any(t.shape[0] % 128 for k, t in tensors.items() if k in refs)  # kv_a_proj: 136 rows (edge block)
        d = str(tmp_path / f"fp8_{ue8m0}")
        os.makedirs(d)
        names = sorted(quant)
        half = len(names) // 2
        wm = {}
        for fn, part in (("model-00001-of-00002.safetensors", names[:half]),
                         ("model-00002-of-00002.safetensors", names[half:])):
            save_file({k: quant[k].contiguous() for k in part}, os.path.join(d, fn), metadata={"format": "pt"})
            wm.update({k: fn for k in part})
        json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(d, "model.safetensors.index.json"), "w"))
        json.dump(dict(cfg, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
                       **({"scale_fmt": "ue8m0"} if ue8m0 else {})), open(os.path.join(d, "config.json"), "w"))
        for dtype, tdtype in (("fp32", torch.float32), (None, torch.bfloat16)):
            ma = str(tmp_path / f"ma_{ue8m0}_{dtype}")
            convert_hf_to_ma(d, ma, 1, 1, 1, save_dtype=dtype, progress=False)
            path = os.path.join(ma, "release")
            idx = tensor_index(path)
            checks = {"model.layers.0.self_attn.kv_a_proj_with_mqa.weight": None,
                      "model.layers.0.mlp.down_proj.weight": None, "model.layers.2.self_attn.q_b_proj.weight": None}
            chunks = []
            for ma_name in checks:
                checks[ma_name] = torch.empty(idx[ma_name][0], dtype=idx[ma_name][1])
                chunks.append(Chunk(ma_name, idx[ma_name][0], (0, 0), checks[ma_name]))
            e = torch.empty((1,) + idx["model.layers.1.mlp.experts.up_proj"][0][1:], dtype=tdtype)
            chunks.append(Chunk("model.layers.1.mlp.experts.up_proj", idx["model.layers.1.mlp.experts.up_proj"][0],
                                (5, 0, 0), e))
            read_chunks(path, chunks)
            for ma_name, got in checks.items():
                assert got.dtype == tdtype
                assert torch.equal(got, refs[ma_name].to(tdtype)), (ue8m0, dtype, ma_name)
            assert torch.equal(e[0], refs["model.layers.1.mlp.experts.5.up_proj.weight"].to(tdtype))
            # the dequantised weights are close to the originals (FP8 has ~2-3 bits of mantissa)
            orig = tensors["model.layers.0.mlp.down_proj.weight"]
            rel = ((checks["model.layers.0.mlp.down_proj.weight"].float() - orig).norm() / orig.norm()).item()
            assert rel < 0.08, rel


def test_clear_errors(hf_dirs, tmp_path):
    from megatron_ascend.checkpointing import CheckpointError
    from megatron_ascend.checkpointing.hf import convert_hf_to_ma
    from megatron_ascend.config import ConfigError
    from safetensors.torch import save_file
    src = hf_dirs["v2"]
    with pytest.raises(ConfigError, match="expert-model-parallel-size 3 does not divide"):
        convert_hf_to_ma(src, str(tmp_path / "x"), 1, 1, 3, progress=False)
    with pytest.raises(ConfigError, match="num-layers 4 does not split"):
        convert_hf_to_ma(src, str(tmp_path / "x"), 1, 3, 1, progress=False)

    def copy(name):
        d = str(tmp_path / name)
        shutil.copytree(src, d)
        return d
    wm = json.load(open(os.path.join(src, "model.safetensors.index.json")))["weight_map"]
    d = copy("missing")
    os.remove(os.path.join(d, wm["model.layers.2.mlp.experts.3.up_proj.weight"]))
    with pytest.raises(CheckpointError, match="shard file.*missing"):
        convert_hf_to_ma(d, str(tmp_path / "x"), progress=False)
    d = copy("shape")
    fn = wm["model.norm.weight"]
    tensors = {k: v for k, v in read_dir(d).items() if wm[k] == fn}
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, os.path.join(d, fn), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"wrong shape.*model.norm.weight \(65,\)"):
        convert_hf_to_ma(d, str(tmp_path / "x"), progress=False)
    d = copy("unknown")
    fn = wm["model.norm.weight"]
    tensors = {k: v for k, v in read_dir(d).items() if wm[k] == fn}
    tensors["model.layers.1.mlp.experts.3.gate_proj.bias"] = torch.ones(32)
    save_file(tensors, os.path.join(d, fn), metadata={"format": "pt"})
    idx = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    idx["weight_map"]["model.layers.1.mlp.experts.3.gate_proj.bias"] = fn
    json.dump(idx, open(os.path.join(d, "model.safetensors.index.json"), "w"))
    with pytest.raises(CheckpointError, match="no counterpart.*gate_proj.bias"):
        convert_hf_to_ma(d, str(tmp_path / "x"), progress=False)
    d = copy("absent")  # a tensor dropped from the index and its file: reported as missing coverage
    idx = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    fn = idx["weight_map"].pop("model.layers.3.self_attn.o_proj.weight")
    tensors = {k: v for k, v in read_dir(d).items() if wm[k] == fn and k != "model.layers.3.self_attn.o_proj.weight"}
    save_file(tensors, os.path.join(d, fn), metadata={"format": "pt"})
    json.dump(idx, open(os.path.join(d, "model.safetensors.index.json"), "w"))
    with pytest.raises(CheckpointError, match="not \\(fully\\) present.*o_proj"):
        convert_hf_to_ma(d, str(tmp_path / "x"), progress=False)
