"""DeepSeek-V4 checkpoint directories: DeepSeek's original naming with FP8 (e4m3 + e8m0 block scales) and FP4
(e2m1 packed two per byte + e8m0 1x32 scales) weights converts to the dequantised reference, checked tensor by
tensor against a dequantisation written here independently (e2m1 decoded from its bit fields, one block at a
time); transformers loads the written directory with the same weights; the name map agrees with transformers'
own state dict and save_pretrained output and round-trips original -> hf -> original; bad input is one clear
error before anything is written; and the release goes through our checkpoint (hf2ma checked for TP 2 x PP 2 x
EP 2, ma2hf in both namings) to the same reference, with transformers loading the export to the same logits.

The synthetic release has a non-square, non-dividing FP8 block (24 x 48 from quantization_config) so edge
blocks are cropped, weights and their scales in different shards, MTP duplicates of the embedding / head, a
hash-routed layer (tid2eid int32), sliding / CSA / HCA layers and an MTP module."""
import json
import os
import shutil

import pytest
import torch

from megatron_ascend.checkpointing import v4_names
from megatron_ascend.config import ModelConfig
from tests.tolerance import assert_equal

BLOCK = (24, 48)
RELEASE_CONFIG = {  # the released config.json style (compress_ratios incl. the MTP entry, num_hash_layers ...)
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 64, "hidden_size": 64,
    "moe_intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1,
    "head_dim": 32, "qk_rope_head_dim": 8, "q_lora_rank": 32, "o_groups": 2, "o_lora_rank": 16,
    "compress_ratios": [0, 4, 128, 0], "compress_rope_theta": 160000.0, "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 64, "beta_fast": 32,
                     "beta_slow": 1},
    "index_n_heads": 2, "index_head_dim": 16, "index_topk": 2, "sliding_window": 4, "n_routed_experts": 4,
    "n_shared_experts": 1, "num_experts_per_tok": 2, "num_hash_layers": 1, "scoring_func": "sqrtsoftplus",
    "norm_topk_prob": True, "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "hc_mult": 2,
    "hc_sinkhorn_iters": 3, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "num_nextn_predict_layers": 1,
    "max_position_embeddings": 256, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "expert_dtype": "fp4",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": list(BLOCK)},
}


# ------------------------------------------------------------------------------ independent references
def e2m1(code: int) -> float:
    """One e2m1 nibble from its bit fields: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0."""
    sign = -1.0 if code & 8 else 1.0
    e, m = (code >> 1) & 3, code & 1
    mag = m * 0.5 if e == 0 else (1.0 + 0.5 * m) * 2.0 ** (e - 1)
    return sign * mag


def ref_fp4(packed: torch.Tensor, scale_bytes: torch.Tensor) -> torch.Tensor:
    """[out, in/2] bytes (low nibble = even column) and [out, in/32] e8m0 bytes -> fp32, one block at a time."""
    table = torch.tensor([e2m1(c) for c in range(16)], dtype=torch.float64)
    b = packed.view(torch.uint8).long()
    out, half = b.shape
    vals = torch.empty(out, 2 * half, dtype=torch.float64)
    vals[:, 0::2], vals[:, 1::2] = table[b & 15], table[b >> 4]
    for r in range(out):
        for j in range(2 * half // 32):
            vals[r, 32 * j:32 * (j + 1)] *= 2.0 ** (int(scale_bytes[r, j]) - 127)
    return vals.float()


def ref_fp8(q: torch.Tensor, scale_bytes: torch.Tensor, block) -> torch.Tensor:
    bm, bn = block
    out = q.double()
    for i in range(scale_bytes.shape[0]):
        for j in range(scale_bytes.shape[1]):
            out[bm * i:bm * (i + 1), bn * j:bn * (j + 1)] *= 2.0 ** (int(scale_bytes[i, j]) - 127)
    return out.float()


def release_dir(d, seed=0, config=RELEASE_CONFIG):
    """A random V4 checkpoint in DeepSeek's original naming and storage; returns {original name: reference}."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    cfg = ModelConfig.from_hf_dict(config)
    tensors, refs = {}, {}
    for name, spec in v4_names.release_inventory(cfg).items():
        shape = spec.shape
        if spec.storage == "fp8":
            q = (torch.randn(shape, generator=g) * 40).to(torch.float8_e4m3fn)
            sb = torch.randint(118, 136, (-(-shape[0] // BLOCK[0]), -(-shape[1] // BLOCK[1])), generator=g,
                               dtype=torch.uint8)
            tensors[name], tensors[name[:-len(".weight")] + ".scale"] = q, sb.view(torch.float8_e8m0fnu)
            refs[name] = ref_fp8(q, sb, BLOCK)
        elif spec.storage == "fp4":
            packed = torch.randint(0, 256, (shape[0], shape[1] // 2), generator=g, dtype=torch.uint8)
            sb = torch.randint(118, 136, (shape[0], shape[1] // 32), generator=g, dtype=torch.uint8)
            tensors[name] = packed.view(torch.int8)
            tensors[name[:-len(".weight")] + ".scale"] = sb.view(torch.float8_e8m0fnu)
            refs[name] = ref_fp4(packed, sb)
        elif spec.storage == "int":
            tensors[name] = torch.randint(0, cfg.n_routed_experts, shape, generator=g, dtype=torch.int32)
            refs[name] = tensors[name]
        else:
            dt = torch.float32 if spec.storage == "fp32" else torch.bfloat16
            tensors[name] = torch.randn(shape, generator=g).to(dt)
            refs[name] = tensors[name].float()
    # the release's MTP copies of the embedding / head (skipped on read)
    tensors["mtp.0.embed.weight"] = tensors["embed.weight"].clone()
    tensors["mtp.0.head.weight"] = tensors["head.weight"].clone()
    # three shards; weights of layer 1 in one shard, their scales in another
    names = sorted(tensors)
    shard_of = {}
    for n in names:
        shard_of[n] = 2 if n.startswith("layers.1.") and n.endswith(".scale") else (0 if n < "layers.1" else 1)
    os.makedirs(d, exist_ok=True)
    wm = {}
    for s in range(3):
        fn = f"model-{s + 1:05d}-of-00003.safetensors"
        part = {n: tensors[n].contiguous() for n in names if shard_of[n] == s}
        save_file(part, os.path.join(d, fn), metadata={"format": "pt"})
        wm.update({n: fn for n in part})
    json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(d, "model.safetensors.index.json"), "w"))
    json.dump(config, open(os.path.join(d, "config.json"), "w"))
    return refs


def read_dir(d):
    from safetensors import safe_open
    out = {}
    for fn in sorted(f for f in os.listdir(d) if f.endswith(".safetensors")):
        with safe_open(os.path.join(d, fn), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("v4") / "release")
    return d, release_dir(d)


# ------------------------------------------------------------------------------ tests
def test_release_converts_to_dequantised_reference_and_transformers_loads_it(release, tmp_path):
    """original FP8 / FP4 -> hf (bf16): every tensor equals the per-block reference (exact in bf16: power-of-two
    scales), fp32 parameters stay fp32, tid2eid int64; transformers loads the directory to the same weights."""
    from megatron_ascend.checkpointing.hf_rewrite import convert_hf_to_hf
    src, refs = release
    out = str(tmp_path / "hf")
    rep = convert_hf_to_hf(src, out, naming="hf", max_shard_bytes=200_000, progress=False)
    assert rep["naming_read"] == "original" and rep["shards"] > 1
    got = read_dir(out)
    assert sorted(got) == sorted(v4_names.disk_name(v4_names.canonical_name(n), "hf") for n in refs)
    stored = read_dir(src)
    quant = {n for n in refs if n[:-len(".weight")] + ".scale" in stored}
    assert any(".experts." in n for n in quant) and any(".wq_a." in n for n in quant)
    for name, ref in refs.items():
        t = got[v4_names.disk_name(v4_names.canonical_name(name), "hf")]
        if "tid2eid" in name:
            assert t.dtype == torch.int64
            assert_equal(t, ref.long(), name)
        elif name.endswith(("_fn", "_base", "_scale", "attn_sink", ".ape", "gate.bias")):
            assert t.dtype == torch.float32, name
            assert_equal(t, ref, name)
        else:
            assert t.dtype == torch.bfloat16, name
            assert_equal(t, ref.to(torch.bfloat16), name)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert "quantization_config" not in cfg and "expert_dtype" not in cfg

    import transformers as T
    model = T.DeepseekV4ForCausalLM.from_pretrained(out, dtype=torch.float32)
    sd = model.state_dict()
    want = {}
    for name, ref in refs.items():
        c = v4_names.canonical_name(name)
        if c.startswith("mtp."):
            continue  # transformers has no MTP module
        want[c] = ref if "tid2eid" in name or name.endswith(("_fn", "_base", "_scale", "attn_sink", ".ape",
                                                                "gate.bias")) else ref.to(torch.bfloat16).float()
    for layer in range(RELEASE_CONFIG["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp.experts"
        E = RELEASE_CONFIG["n_routed_experts"]
        want[f"{p}.gate_up_proj"] = torch.stack([torch.cat([want.pop(f"{p}.{e}.gate_proj.weight"),
                                                            want.pop(f"{p}.{e}.up_proj.weight")]) for e in range(E)])
        want[f"{p}.down_proj"] = torch.stack([want.pop(f"{p}.{e}.down_proj.weight") for e in range(E)])
    params = {k for k in sd if "rotary_emb" not in k}
    assert params == set(want), (sorted(params ^ set(want)))[:6]
    for k in params:
        assert_equal(sd[k].to(want[k].dtype), want[k], k)


def test_naming_round_trip_and_fp32_output(release, tmp_path):
    """original -> hf -> original gives the source's names (less scales and MTP duplicates) and values;
    --save-dtype fp32 in the original naming equals the fp32 reference."""
    from megatron_ascend.checkpointing.hf_rewrite import convert_hf_to_hf
    src, refs = release
    convert_hf_to_hf(src, str(tmp_path / "hf"), naming="hf", progress=False)
    rep = convert_hf_to_hf(str(tmp_path / "hf"), str(tmp_path / "orig"), naming="original", progress=False)
    assert rep["naming_read"] == "hf-saved"
    back = read_dir(str(tmp_path / "orig"))
    assert sorted(back) == sorted(refs)
    for name, ref in refs.items():
        if back[name].dtype == torch.bfloat16:
            assert_equal(back[name], ref.to(torch.bfloat16), name)
    convert_hf_to_hf(src, str(tmp_path / "fp32"), naming="original", save_dtype="fp32", progress=False)
    f32 = read_dir(str(tmp_path / "fp32"))
    assert sorted(f32) == sorted(refs)
    for name, ref in refs.items():
        assert_equal(f32[name], ref.long() if "tid2eid" in name else ref, name)


def test_name_map_matches_transformers(tmp_path):
    """Canonical names of the release inventory = transformers' state dict (experts per expert), same shapes;
    disk_name(.., 'hf') = what transformers' save_pretrained writes; original names round-trip."""
    import transformers as T
    cfg = T.DeepseekV4Config(vocab_size=64, hidden_size=32, moe_intermediate_size=32, num_hidden_layers=4,
                             num_attention_heads=4, head_dim=32, q_lora_rank=16, qk_rope_head_dim=8,
                             n_routed_experts=4, num_experts_per_tok=2, o_groups=2, o_lora_rank=8, index_n_heads=2,
                             index_head_dim=16, index_topk=2, sliding_window=4, compress_ratios=[0, 4, 128, 4, 0],
                             num_hash_layers=2, hc_mult=3)
    model = T.DeepseekV4ForCausalLM(cfg)
    model.save_pretrained(str(tmp_path))
    ours = ModelConfig.from_hf_dict(json.load(open(tmp_path / "config.json")))
    inv = v4_names.release_inventory(ours)
    canon = {v4_names.canonical_name(k): s.shape for k, s in inv.items()}
    want = {}
    for k, v in model.state_dict().items():
        if "rotary_emb" in k:
            continue
        if k.endswith("experts.gate_up_proj"):
            for e in range(v.shape[0]):
                for part in ("gate_proj", "up_proj"):
                    want[f"{k[:-len('gate_up_proj')]}{e}.{part}.weight"] = (v.shape[1] // 2, v.shape[2])
        elif k.endswith("experts.down_proj"):
            for e in range(v.shape[0]):
                want[f"{k[:-len('down_proj')]}{e}.down_proj.weight"] = tuple(v.shape[1:])
        else:
            want[k] = tuple(v.shape)
    main = {k: v for k, v in canon.items() if not k.startswith("mtp.")}
    assert main == want
    saved = set(read_dir(str(tmp_path)))
    assert {v4_names.disk_name(k, "hf") for k in main} == saved
    assert v4_names.detect_naming(saved) == "hf-saved"
    assert v4_names.detect_naming(inv) == "original"
    assert v4_names.detect_naming(model.state_dict()) == "hf"
    for k in inv:
        c = v4_names.canonical_name(k)
        assert v4_names.disk_name(c, "original") == k
        assert v4_names.canonical_name(v4_names.disk_name(c, "hf")) == c
        assert v4_names.canonical_name("model." + k) == c  # a "model."-prefixed copy of the release
    assert any(k.startswith("mtp.0.attn.") for k in inv) and v4_names.canonical_name("mtp.0.head.weight") is None
    # transformers' in-memory names (fused experts) read too: rewritten per expert, loaded back unchanged
    from safetensors.torch import save_file
    from megatron_ascend.checkpointing.hf_rewrite import convert_hf_to_hf
    mem = tmp_path / "mem"
    mem.mkdir()
    sd = {k: v for k, v in model.state_dict().items() if "rotary_emb" not in k}
    save_file(sd, str(mem / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(tmp_path / "config.json", mem)
    rep = convert_hf_to_hf(str(mem), str(tmp_path / "split"), progress=False)
    assert rep["naming_read"] == "hf" and set(read_dir(str(tmp_path / "split"))) == saved
    again = T.DeepseekV4ForCausalLM.from_pretrained(str(tmp_path / "split"), dtype=torch.float32).state_dict()
    for k, v in sd.items():
        assert_equal(again[k], v, k)


def test_dequantisation_units():
    """fp8 / fp4 helpers against the references above; e8m0 edge bytes; FP4 quantisation round trip."""
    from megatron_ascend.checkpointing import fp4, fp8
    raw = torch.tensor([0, 1, 126, 127, 128, 254], dtype=torch.uint8)
    assert_equal(fp8.decode_e8m0(raw), torch.tensor([2.0 ** (int(b) - 127) for b in raw], dtype=torch.float32))
    assert torch.isnan(fp8.decode_e8m0(torch.tensor([255], dtype=torch.uint8))).all()
    assert_equal(fp8.decode_e8m0(raw.view(torch.float8_e8m0fnu)), fp8.decode_e8m0(raw))
    assert_equal(fp8.encode_e8m0(fp8.decode_e8m0(raw)).view(torch.uint8), raw)
    g = torch.Generator().manual_seed(1)
    packed = torch.randint(0, 256, (5, 48), generator=g, dtype=torch.uint8)
    sb = torch.randint(100, 150, (5, 3), generator=g, dtype=torch.uint8)
    for stored in (packed.view(torch.int8), packed, packed.view(torch.float4_e2m1fn_x2)):
        assert_equal(fp4.dequantize_fp4(stored, sb.view(torch.float8_e8m0fnu), torch.float32), ref_fp4(packed, sb))
    q = (torch.randn(50, 70, generator=g) * 30).to(torch.float8_e4m3fn)
    s8 = torch.randint(110, 140, (3, 2), generator=g, dtype=torch.uint8)
    assert_equal(fp8.dequantize_blocks(q, s8.view(torch.float8_e8m0fnu), torch.float32, block=(24, 48)),
                 ref_fp8(q, s8, (24, 48)))
    w = torch.randn(6, 64, generator=g)
    p, s = fp4.quantize_fp4(w)
    back = fp4.dequantize_fp4(p, s, torch.float32)
    step = fp8.decode_e8m0(s).repeat_interleave(32, 1)  # the coarsest e2m1 spacing (4 -> 6) is 2 * scale
    assert float(((back - w).abs() / step).max()) <= 1.0 + 1e-6
    assert float((back - w).abs().max()) < float(w.abs().max())
    q2, s2 = fp8.quantize_blocks(w, block=(4, 32), e8m0=True)
    assert s2.dtype == torch.float8_e8m0fnu
    assert_equal(fp8.dequantize_blocks(q2, s2, torch.float32, block=(4, 32)),
                 fp8.dequantize_blocks(q2, fp8.decode_e8m0(s2), torch.float32, block=(4, 32)))


def test_bad_input_is_one_clear_error(release, tmp_path):
    """A missing FP8 / FP4 scale, a scale of the wrong shape, a stray scale, an unknown tensor, a wrong shape,
    mixed namings: one CheckpointError naming the tensor, and no output directory."""
    from safetensors.torch import save_file
    from megatron_ascend.checkpointing import CheckpointError
    from megatron_ascend.checkpointing.hf_rewrite import convert_hf_to_hf
    src, _ = release
    tensors = read_dir(src)

    def variant(tag, drop=(), add=None):  # the release as one model.safetensors, edited
        d = str(tmp_path / tag)
        os.makedirs(d)
        shutil.copy(os.path.join(src, "config.json"), d)
        part = {k: v for k, v in tensors.items() if k not in drop}
        part.update(add or {})
        save_file(part, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        return d

    cases = [
        (variant("noscale8", drop=("layers.0.attn.wq_a.scale",)),
         r"layers\.0\.attn\.wq_a\.weight is float8_e4m3fn but its block scale layers\.0\.attn\.wq_a\.scale is missing"),
        (variant("noscale4", drop=("layers.2.ffn.experts.3.w2.scale",)),
         r"layers\.2\.ffn\.experts\.3\.w2\.weight is packed FP4 \(I8\) but its scale .*w2\.scale is missing"),
        (variant("badscale", add={"layers.0.attn.wkv.scale": torch.zeros(3, 2, dtype=torch.uint8)}),
         r"layers\.0\.attn\.wkv\.scale \(3, 2\) for FP8 weight layers\.0\.attn\.wkv\.weight \(32, 64\) "
         r"\(expected \(2, 2\): 24x48 blocks"),
        (variant("badfp4scale", add={"layers.1.ffn.experts.0.w1.scale": torch.zeros(64, 3, dtype=torch.uint8)}),
         r"layers\.1\.ffn\.experts\.0\.w1\.scale \(64, 3\) for FP4 weight .*expected \(64, 2\)"),
        (variant("stray", add={"layers.0.attn.wz.scale": torch.zeros(1, 1, dtype=torch.uint8)}),
         r"scale tensor\(s\) without their weight, e\.g\. layers\.0\.attn\.wz\.scale"),
        (variant("unknown", add={"layers.0.attn.wq_c.weight": torch.zeros(2, 2)}),
         r"no DeepSeek-V4 tensor .* e\.g\. layers\.0\.attn\.wq_c\.weight"),
        (variant("shape", add={"norm.weight": torch.zeros(65)}),
         r"wrong shape for config\.json: model\.norm\.weight \(65,\) \(expected \(64,\)\)"),
        (variant("missing", drop=("layers.2.attn.compressor.ape",)),
         r"1 tensor\(s\) of a DeepSeek-V4 checkpoint are missing, e\.g\. "
         r"model\.layers\.2\.self_attn\.compressor\.position_bias"),
        (variant("mixed", add={"model.layers.0.self_attn.q_a_proj.weight": torch.zeros(32, 64)}),
         r"mixes tensor namings"),
    ]
    for d, pattern in cases:
        out = d + "_out"
        with pytest.raises(CheckpointError, match=pattern):
            convert_hf_to_hf(d, out, progress=False)
        assert not os.path.exists(out) and not os.path.exists(out + ".tmp"), d


def test_cli(release, tmp_path, capsys):
    """tools/convert_ckpt.py --direction hf2hf in-process; --save-naming on hf2ma is refused up front."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import convert_ckpt
    src, refs = release
    convert_ckpt.main(["--direction", "hf2hf", "--load-dir", src, "--save-dir", str(tmp_path / "o"),
                       "--save-naming", "original", "--no-progress", "--max-shard-size", "100KB"])
    out = capsys.readouterr().out
    assert "in the 'original' naming" in out and "note: " in out and "skipped 2 MTP duplicate" in out
    assert sorted(read_dir(str(tmp_path / "o"))) == sorted(refs)
    with pytest.raises(SystemExit):
        convert_ckpt.main(["--direction", "hf2ma", "--load-dir", src, "--save-dir", str(tmp_path / "m"),
                           "--save-naming", "original"])
    assert "--save-naming applies to ma2hf and hf2hf" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_ckpt.main(["--direction", "hf2hf", "--load-dir", src, "--save-dir", str(tmp_path / "o")])
    assert "is not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_ckpt.main(["--direction", "hf2hf", "--load-dir", src, "--save-dir", str(tmp_path / "w"),
                           "--workers", "4"])
    assert "--workers: not used by --direction hf2hf" in capsys.readouterr().err


def _v4_model_in_tree():
    try:
        from megatron_ascend.models.registry import model_class
        model_class("deepseek_v4")
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _v4_model_in_tree(), reason="needs the V4 model (models/deepseek_v4, registry)")
def test_release_through_our_checkpoint(tmp_path):
    """original FP8 / FP4 -> hf2ma (checked for TP 2 x PP 2 x EP 2) -> ma2hf: every tensor equals the per-block
    reference bitwise in both namings (MTP and tid2eid included); transformers loads the export to the logits
    of the dequantised reference directory."""
    import transformers as T
    from megatron_ascend.checkpointing import read_common
    from megatron_ascend.checkpointing.hf import convert_hf_to_ma, convert_ma_to_hf
    from megatron_ascend.checkpointing.hf_rewrite import convert_hf_to_hf
    config = dict(RELEASE_CONFIG, num_hidden_layers=4, compress_ratios=[0, 4, 128, 4, 0])
    src, ref, ma = str(tmp_path / "release"), str(tmp_path / "ref"), str(tmp_path / "ma")
    refs = release_dir(src, seed=2, config=config)
    inventory = v4_names.release_inventory(ModelConfig.from_hf_dict(config))
    convert_hf_to_hf(src, ref, progress=False)
    rep = convert_hf_to_ma(src, ma, 2, 2, 2, progress=False)
    assert not rep["notes"], rep["notes"]
    assert read_common(os.path.join(ma, "release"))["converted_for_layout"] == {"tp": 2, "pp": 2, "ep": 2, "vp": None}
    for naming in ("hf", "original"):
        back = str(tmp_path / f"back_{naming}")
        out = convert_ma_to_hf(ma, back, max_shard_bytes=150_000, naming=naming, progress=False)
        assert out["shards"] > 1
        got = read_dir(back)
        names = {v4_names.disk_name(v4_names.canonical_name(n), naming): n for n in refs}
        assert sorted(got) == sorted(names)
        for k, n in names.items():
            dtype = {"int": torch.int64, "fp32": torch.float32}.get(inventory[n].storage, torch.bfloat16)
            assert got[k].dtype == dtype, k
            assert_equal(got[k].double(), refs[n].double(), k)  # lossless: the reference is exact in bf16
    # tools/forward.py --hf-dir reads the release directly (canonical names, dequantised)
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    from forward import LazyHF
    lazy = LazyHF(src, dtype=torch.float32)
    assert sorted(lazy) == sorted(v4_names.canonical_name(n) for n in refs)
    for n, want in refs.items():
        assert_equal(lazy[v4_names.canonical_name(n)].double(), want.double(), n)
    ids = torch.randint(0, config["vocab_size"], (2, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = T.DeepseekV4ForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()(ids).logits
        b = T.DeepseekV4ForCausalLM.from_pretrained(str(tmp_path / "back_hf"), dtype=torch.float32).eval()(ids).logits
    assert torch.isfinite(a).all()
    assert_equal(b, a, "logits")
