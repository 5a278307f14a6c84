"""DeepSeek-V4 HF <-> our checkpoint (checkpointing/hf.py with models/deepseek(_v4)/hf_names.py): a tiny V4 in
transformers' canonical names (per-expert expert weights, an MTP block ``mtp.0.*``, the hash tables, several
shards) converts to our checkpoint at TP 2 x PP 2 x EP 2 and back bitwise (tid2eid stays int64 and the router
bias fp32 on --save-dtype bf16); tools/forward.py on the converted checkpoint at TP 2 x PP 2 x EP 2 gives
transformers' logits within 1e-5; and transformers loads the export (through the V4 writer's 'hf' naming of
checkpointing/, when present) to the original logits."""
import inspect
import json
import os

import pytest
import torch

from tests import v4_reference as R
from tests.harness import run_distributed
from tests.test_forward_tool import body_forward
from tests.test_hf_conversion import assert_bitwise, read_dir


def read_canonical(d):
    """name -> tensor of a HF directory in canonical names (checkpointing's V4 reader maps every on-disk naming
    to them when present; without it the directory is read as written)."""
    try:
        from megatron_ascend.checkpointing.hf_dir import load_tensor, read_hf_dir
    except ImportError:
        return read_dir(d)
    return {k: load_tensor(src) for k, src in read_hf_dir(d).tensors.items()}

LAYERS = dict(num_hidden_layers=4, layer_types=[R.SLIDING, R.CSA, R.HCA, R.CSA],
              mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"])


def canonical_state(hf, mtp):
    """transformers' in-memory names with the experts split per expert (what checkpointing reads any V4 naming
    into), plus the MTP block as ``mtp.0.*``."""
    I = hf.config.moe_intermediate_size
    out = {}
    items = list(hf.state_dict().items()) + [(f"mtp.0.{k}", v) for k, v in mtp.state_dict().items()]
    for k, v in items:
        if k.endswith("experts.gate_up_proj"):
            p = k[: -len("gate_up_proj")]
            for e in range(v.shape[0]):
                out[f"{p}{e}.gate_proj.weight"] = v[e, :I].clone()
                out[f"{p}{e}.up_proj.weight"] = v[e, I:].clone()
        elif k.endswith("experts.down_proj"):
            p = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{p}{e}.down_proj.weight"] = v[e].clone()
        else:
            out[k] = v.detach().clone().contiguous()
    return out


def write_dir(sd, config, d, shard_bytes=40_000):
    from safetensors.torch import save_file
    os.makedirs(d, exist_ok=True)
    shards, cur, size = [], {}, 0
    for k in sorted(sd):
        cur[k] = sd[k]
        size += sd[k].numel() * sd[k].element_size()
        if size > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
    if cur:
        shards.append(cur)
    wm = {}
    for i, sh in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, os.path.join(d, fn), metadata={"format": "pt"})
        wm.update({k: fn for k in sh})
    json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(d, "model.safetensors.index.json"), "w"))
    json.dump(config, open(os.path.join(d, "config.json"), "w"))
    return d


@pytest.fixture(scope="module")
def v4_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("v4hf")
    cfg_hf, hf = R.build_hf(0, **LAYERS)
    hf.eval()
    mcfg = hf_config_with_mtp(cfg_hf)
    mtp = R._mtp_block_class()(mcfg, cfg_hf.num_hidden_layers).float()
    R.randomize_module(mtp, 7, cfg_hf.n_routed_experts)
    d = write_dir(canonical_state(hf, mtp), cfg_hf.to_dict(), str(root / "src"))
    return d, hf


def hf_config_with_mtp(cfg_hf):
    import copy
    m = copy.deepcopy(cfg_hf)
    m.layer_types = list(cfg_hf.layer_types) + [R.SLIDING]
    m.mlp_layer_types = list(cfg_hf.mlp_layer_types) + ["moe"]
    return m


def test_v4_round_trip_bitwise_and_forward_at_tp2_pp2_ep2(v4_dir, tmp_path):
    from megatron_ascend.checkpointing.dcp_io import tensor_index
    from megatron_ascend.checkpointing.hf import convert_hf_to_ma, convert_ma_to_hf
    src, hf = v4_dir
    original = read_canonical(src)
    assert any(k.startswith("mtp.0.") for k in original) and any(k.endswith("tid2eid") for k in original)
    ma = str(tmp_path / "ma")
    rep = convert_hf_to_ma(src, ma, 2, 2, 2, progress=False)
    assert not rep["notes"], rep["notes"]
    idx = tensor_index(os.path.join(ma, "release"))
    assert idx["model.layers.0.mlp.gate.tid2eid"][1] == torch.int64
    assert "mtp.layers.0.hc_head.hc_fn" in idx and "model.hc_head.hc_fn" in idx
    back = str(tmp_path / "back")
    out = convert_ma_to_hf(ma, back, max_shard_bytes=60_000, progress=False)
    assert out["shards"] > 1
    assert_bitwise(original, read_canonical(back))
    # --save-dtype bf16: the hash tables keep int64, the router bias fp32
    ma16 = str(tmp_path / "ma16")
    convert_hf_to_ma(src, ma16, 1, 1, 1, save_dtype="bf16", progress=False)
    idx = tensor_index(os.path.join(ma16, "release"))
    assert idx["model.layers.1.mlp.gate.tid2eid"][1] == torch.int64
    assert idx["model.layers.2.mlp.gate.e_score_correction_bias"][1] == torch.float32
    assert idx["model.layers.2.mlp.experts.gate_proj"][1] == torch.bfloat16
    # our model on the converted checkpoint at TP2 x PP2 x EP2 (tools/forward.py) gives transformers' logits
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, hf.config.vocab_size, (2, 40), generator=g)
    ids_path = str(tmp_path / "ids.pt")
    torch.save({"input_ids": ids}, ids_path)
    with torch.no_grad():
        ref = hf(ids).logits.float()
    res = run_distributed(4, body_forward, ma, None, ids_path, str(tmp_path), 2, 2, 2, timeout=400)
    (writer,) = [r for r in res if r["ckpt"] is not None]
    got = torch.load(writer["ckpt"], weights_only=True)["logits"]
    from tests.tolerance import MODEL_REL, assert_rel
    assert_rel(got, ref, MODEL_REL, "forward tool at TP2 PP2 EP2 vs transformers")


def test_transformers_loads_v4_export(v4_dir, tmp_path):
    from tests.tolerance import MODEL_REL, assert_equal, assert_rel
    from megatron_ascend.checkpointing.hf import convert_hf_to_ma, convert_ma_to_hf
    if "naming" not in inspect.signature(convert_ma_to_hf).parameters:
        pytest.skip("transformers reads V4 experts only in its save_pretrained names (experts.E.w1/w2/w3); "
                    "checkpointing's V4 writer (naming='hf') writes them")
    import transformers
    src, hf = v4_dir
    ma = str(tmp_path / "ma")
    convert_hf_to_ma(src, ma, 2, 2, 2, progress=False)
    back = str(tmp_path / "back")
    convert_ma_to_hf(ma, back, max_shard_bytes=60_000, progress=False, naming="hf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    want, got = hf.state_dict(), loaded.state_dict()
    assert sorted(want) == sorted(got)
    for k in want:
        assert_equal(got[k], want[k], f"transformers' {k} loaded from our export")
    ids = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # equal weights; the loaded copies' memory layout may change GEMM blocking
        assert_rel(loaded(ids).logits, hf(ids).logits, MODEL_REL, "logits of the export")
