"""DeepSeek-V4 tensor names on disk: DeepSeek's original naming <-> transformers' naming, and the release's
tensor inventory (names, shapes, storage formats) for a config.

Three namings occur in V4 directories (all three load in transformers 5.24, which renames on load):

  original   DeepSeek's release and its ``inference/model.py``: ``embed.weight``, ``head.weight``, ``norm.weight``,
             ``hc_head_{fn,base,scale}``, ``layers.N.attn.wq_a.weight`` (+ ``.scale``), ``layers.N.ffn.experts.E.w1``,
             ``layers.N.hc_attn_fn``, ``mtp.K.*`` (a ``model.`` prefix, seen in some copies, is accepted).
  hf-saved   what transformers' ``save_pretrained`` writes for DeepseekV4ForCausalLM (its load-time renames
             reversed): ``model.layers.N.<original leaf>`` except the attention's ``kv_norm``, written
             ``attn.norm``; ``model.embed_tokens.weight``, ``model.norm.weight``, ``model.hc_head.hc_fn``,
             ``head.weight``. ``--save-naming hf`` writes this.
  hf         transformers' in-memory state-dict names: ``model.layers.N.self_attn.q_a_proj.weight``,
             ``...mlp.experts.gate_up_proj [E, 2I, h]`` (fused) ... (e.g. ``save_file(model.state_dict())``).

**Canonical names** (what ``hf_dir.read_hf_dir`` hands to the model's name mapping, and what the writer takes):
transformers' in-memory names, except that routed experts are per expert,
``model.layers.N.mlp.experts.E.{gate_proj,up_proj,down_proj}.weight`` (original ``w1``, ``w3``, ``w2``; the V3
hub convention); fused ``gate_up_proj`` / ``down_proj`` pass through. transformers has no MTP module (it
ignores ``mtp.*``), so MTP module K is ``mtp.K.<the layer's canonical leaf>`` plus ``e_proj.weight``,
``h_proj.weight``, ``enorm.weight``, ``hnorm.weight``, ``norm.weight``, ``hc_head.hc_{fn,base,scale}``; it is
written with original leaves (``mtp.K.attn.wq_a.weight``) in both namings. The release's MTP copies of the
embedding / head (``mtp.K.emb*``, ``mtp.K.head.weight``) are duplicates and are skipped, as DeepSeek's
``convert.py`` does.

The leaf table follows transformers' ``conversion_mapping.py`` entry for ``deepseek_v4``; a test checks it
against transformers' own state dict and ``save_pretrained`` output.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

NAMINGS = ("hf", "original")  # what the writer offers (hf = transformers' save_pretrained names)


class UnknownName(ValueError):
    """A tensor name that is no DeepSeek-V4 tensor in any of the three namings."""


# ------------------------------------------------------------------------------------------ leaf tables
_LEAVES = {  # per-layer leaf: original -> transformers (canonical)
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "hc_attn_fn": "attn_hc.fn", "hc_attn_base": "attn_hc.base", "hc_attn_scale": "attn_hc.scale",
    "hc_ffn_fn": "ffn_hc.fn", "hc_ffn_base": "ffn_hc.base", "hc_ffn_scale": "ffn_hc.scale",
    "attn.attn_sink": "self_attn.sinks",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    "attn.compressor.ape": "self_attn.compressor.position_bias",
    "attn.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
    "attn.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
    "attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "attn.indexer.compressor.ape": "self_attn.compressor.indexer.position_bias",
    "attn.indexer.compressor.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "attn.indexer.compressor.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "attn.indexer.compressor.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
}
_LEAVES_BACK = {v: k for k, v in _LEAVES.items()}
_HF_SAVED_LEAF = {"attn.kv_norm.weight": "attn.norm.weight"}  # transformers' reversed rename writes these
_HF_SAVED_LEAF_BACK = {v: k for k, v in _HF_SAVED_LEAF.items()}
_W = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_W_BACK = {v: k for k, v in _W.items()}
_ORIG_EXPERT = re.compile(r"^ffn\.experts\.(\d+)\.(w[123])\.weight$")
_HF_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_HF_FUSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")

_TOP = {  # model-level: original / hf-saved / hf (after dropping a "model." prefix) -> canonical
    "embed.weight": "model.embed_tokens.weight", "embed_tokens.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight", "lm_head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn", "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
    "hc_head.hc_fn": "model.hc_head.hc_fn", "hc_head.hc_base": "model.hc_head.hc_base",
    "hc_head.hc_scale": "model.hc_head.hc_scale",
}
_TOP_WRITE = {
    "original": {"model.embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight",
                 "model.norm.weight": "norm.weight", "model.hc_head.hc_fn": "hc_head_fn",
                 "model.hc_head.hc_base": "hc_head_base", "model.hc_head.hc_scale": "hc_head_scale"},
    "hf": {"model.embed_tokens.weight": "model.embed_tokens.weight", "lm_head.weight": "head.weight",
           "model.norm.weight": "model.norm.weight", "model.hc_head.hc_fn": "model.hc_head.hc_fn",
           "model.hc_head.hc_base": "model.hc_head.hc_base", "model.hc_head.hc_scale": "model.hc_head.hc_scale"},
}
_MTP_LEAVES = {  # MTP-only leaves: original -> canonical
    "e_proj.weight": "e_proj.weight", "h_proj.weight": "h_proj.weight", "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight", "norm.weight": "norm.weight",
    "hc_head_fn": "hc_head.hc_fn", "hc_head_base": "hc_head.hc_base", "hc_head_scale": "hc_head.hc_scale",
}
_MTP_LEAVES_BACK = {v: k for k, v in _MTP_LEAVES.items()}
_INDEXED = re.compile(r"^(layers|mtp)\.(\d+)\.(.+)$")
_CANON_INDEXED = re.compile(r"^(model\.layers|mtp)\.(\d+)\.(.+)$")
_HF_LEAF_MARKERS = ("self_attn.", "mlp.", "input_layernorm.", "post_attention_layernorm.", "attn_hc.", "ffn_hc.")


def _strip(name: str) -> Tuple[str, bool]:
    return (name[len("model."):], True) if name.startswith("model.") else (name, False)


def _layer_leaf(leaf: str, full: str) -> str:
    """Any naming's per-layer leaf -> canonical leaf."""
    if leaf in _LEAVES:
        return _LEAVES[leaf]
    if leaf in _HF_SAVED_LEAF_BACK:
        return _LEAVES[_HF_SAVED_LEAF_BACK[leaf]]
    if leaf in _LEAVES_BACK or leaf in _HF_FUSED or _HF_EXPERT.match(leaf):
        return leaf
    m = _ORIG_EXPERT.match(leaf)
    if m:
        return f"mlp.experts.{m.group(1)}.{_W[m.group(2)]}.weight"
    raise UnknownName(full)


def is_mtp_duplicate(name: str) -> bool:
    """The release's MTP copies of the shared embedding / head (``mtp.K.emb...``, ``mtp.K.head.weight``)."""
    body, _ = _strip(name)
    m = _INDEXED.match(body)
    return bool(m and m.group(1) == "mtp" and (m.group(3).startswith("emb") or m.group(3) == "head.weight"))


def canonical_name(name: str) -> Optional[str]:
    """A V4 tensor name in any naming -> its canonical name; None for the MTP duplicates; UnknownName if it is
    no V4 tensor."""
    body, _ = _strip(name)
    if body in _TOP:
        return _TOP[body]
    m = _INDEXED.match(body)
    if not m:
        raise UnknownName(name)
    kind, idx, leaf = m.groups()
    if kind == "mtp":
        if is_mtp_duplicate(name):
            return None
        if leaf in _MTP_LEAVES:
            return f"mtp.{idx}.{_MTP_LEAVES[leaf]}"
        if leaf in _MTP_LEAVES_BACK:
            return f"mtp.{idx}.{leaf}"
        return f"mtp.{idx}.{_layer_leaf(leaf, name)}"
    return f"model.layers.{idx}.{_layer_leaf(leaf, name)}"


def _original_leaf(leaf: str, canonical: str) -> str:
    if leaf in _LEAVES_BACK:
        return _LEAVES_BACK[leaf]
    m = _HF_EXPERT.match(leaf)
    if m:
        return f"ffn.experts.{m.group(1)}.{_W_BACK[m.group(2)]}.weight"
    if leaf in _HF_FUSED:
        raise UnknownName(f"{canonical} is transformers' fused expert tensor; split it per expert before writing "
                          f"DeepSeek's naming")
    raise UnknownName(canonical)


def disk_name(canonical: str, naming: str) -> str:
    """Canonical name -> the name written under ``naming`` ('hf': transformers' save_pretrained names;
    'original': DeepSeek's release names)."""
    if naming not in NAMINGS:
        raise ValueError(f"unknown naming {naming!r}; use one of {', '.join(NAMINGS)}")
    if canonical in _TOP_WRITE[naming]:
        return _TOP_WRITE[naming][canonical]
    m = _CANON_INDEXED.match(canonical)
    if not m:
        raise UnknownName(canonical)
    kind, idx, leaf = m.groups()
    if kind == "mtp":
        if leaf in _MTP_LEAVES_BACK:
            return f"mtp.{idx}.{_MTP_LEAVES_BACK[leaf]}"
        return f"mtp.{idx}.{_original_leaf(leaf, canonical)}"
    orig = _original_leaf(leaf, canonical)
    if naming == "original":
        return f"layers.{idx}.{orig}"
    return f"model.layers.{idx}.{_HF_SAVED_LEAF.get(orig, orig)}"


def detect_naming(names: Iterable[str]) -> str:
    """'original', 'hf-saved' or 'hf' from the per-layer tensor names (MTP and model-level names are alike in
    several namings). A directory that mixes transformers' leaves with DeepSeek's is refused."""
    seen: Dict[str, str] = {}
    for n in names:
        body, prefixed = _strip(n)
        m = _INDEXED.match(body)
        if not m or m.group(1) != "layers":
            continue
        leaf = m.group(3)
        kind = "hf" if leaf.startswith(_HF_LEAF_MARKERS) else ("hf-saved" if prefixed else "original")
        seen.setdefault(kind, n)
    if len(seen) > 1:
        ex = "; ".join(f"{k}: {v}" for k, v in sorted(seen.items()))
        raise UnknownName(f"the directory mixes tensor namings ({ex}); convert from one consistent checkpoint")
    return next(iter(seen), "hf")


# ------------------------------------------------------------------------------------------ inventory
@dataclass(frozen=True)
class Spec:
    shape: Tuple[int, ...]  # logical (dequantised) shape
    storage: str  # as the release stores it: 'fp8' (e4m3 + e8m0 128x128), 'fp4' (e2m1 + e8m0 1x32), 'bf16',
    #               'fp32', 'int' (tid2eid)


def _layer_inventory(cfg, prefix: str, ratio: int, hashed: bool) -> "OrderedDict[str, Spec]":
    d, H, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    q, G, og = cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank
    hc, E, I = cfg.hc_mult, cfg.n_routed_experts, cfg.moe_intermediate_size
    mix = (2 + hc) * hc
    out: "OrderedDict[str, Spec]" = OrderedDict()

    def add(leaf, shape, storage):
        out[f"{prefix}.{leaf}"] = Spec(tuple(shape), storage)
    add("attn_norm.weight", (d,), "bf16")
    add("ffn_norm.weight", (d,), "bf16")
    for part in ("attn", "ffn"):
        add(f"hc_{part}_fn", (mix, hc * d), "fp32")
        add(f"hc_{part}_base", (mix,), "fp32")
        add(f"hc_{part}_scale", (3,), "fp32")
    add("attn.attn_sink", (H,), "fp32")
    add("attn.wq_a.weight", (q, d), "fp8")
    add("attn.q_norm.weight", (q,), "bf16")
    add("attn.wq_b.weight", (H * hd, q), "fp8")
    add("attn.wkv.weight", (hd, d), "fp8")
    add("attn.kv_norm.weight", (hd,), "bf16")
    add("attn.wo_a.weight", (G * og, H * hd // G), "fp8")
    add("attn.wo_b.weight", (d, G * og), "fp8")
    if ratio:
        c = 2 if ratio == 4 else 1
        add("attn.compressor.ape", (ratio, c * hd), "fp32")
        add("attn.compressor.wkv.weight", (c * hd, d), "bf16")
        add("attn.compressor.wgate.weight", (c * hd, d), "bf16")
        add("attn.compressor.norm.weight", (hd,), "bf16")
    if ratio == 4:
        ih, ihd = cfg.index_n_heads, cfg.index_head_dim
        add("attn.indexer.wq_b.weight", (ih * ihd, q), "fp8")
        add("attn.indexer.weights_proj.weight", (ih, d), "bf16")
        add("attn.indexer.compressor.ape", (ratio, 2 * ihd), "fp32")
        add("attn.indexer.compressor.wkv.weight", (2 * ihd, d), "bf16")
        add("attn.indexer.compressor.wgate.weight", (2 * ihd, d), "bf16")
        add("attn.indexer.compressor.norm.weight", (ihd,), "bf16")
    add("ffn.gate.weight", (E, d), "bf16")
    if hashed:
        add("ffn.gate.tid2eid", (cfg.vocab_size, cfg.num_experts_per_tok), "int")
    else:
        add("ffn.gate.bias", (E,), "fp32")
    for e in range(E):
        add(f"ffn.experts.{e}.w1.weight", (I, d), "fp4")
        add(f"ffn.experts.{e}.w2.weight", (d, I), "fp4")
        add(f"ffn.experts.{e}.w3.weight", (I, d), "fp4")
    S = I * max(cfg.n_shared_experts, 1)
    add("ffn.shared_experts.w1.weight", (S, d), "fp8")
    add("ffn.shared_experts.w2.weight", (d, S), "fp8")
    add("ffn.shared_experts.w3.weight", (S, d), "fp8")
    return out


def release_inventory(cfg) -> "OrderedDict[str, Spec]":
    """Every tensor of a V4 checkpoint for ``cfg`` (a ModelConfig), in DeepSeek's original naming and release
    order, with its logical shape and the release's storage format (scales not listed: an 'fp8' / 'fp4' weight
    ``X.weight`` comes with ``X.scale``). The MTP modules' attention is sliding-only unless ``compress_ratios``
    lists an entry for them (the release lists one, 0)."""
    d, hc, V, L = cfg.hidden_size, cfg.hc_mult, cfg.vocab_size, cfg.num_hidden_layers
    ratios = tuple(cfg.compress_ratios)
    out: "OrderedDict[str, Spec]" = OrderedDict()
    out["embed.weight"] = Spec((V, d), "bf16")
    for i in range(L):
        out.update(_layer_inventory(cfg, f"layers.{i}", ratios[i] if i < len(ratios) else 0,
                                    i < cfg.num_hash_layers))
    out["norm.weight"] = Spec((d,), "bf16")
    out["head.weight"] = Spec((V, d), "bf16")
    out["hc_head_fn"] = Spec((hc, hc * d), "fp32")
    out["hc_head_base"] = Spec((hc,), "fp32")
    out["hc_head_scale"] = Spec((1,), "fp32")
    for k in range(cfg.num_nextn_predict_layers):
        p = f"mtp.{k}"
        out[f"{p}.e_proj.weight"] = Spec((d, d), "fp8")
        out[f"{p}.h_proj.weight"] = Spec((d, d), "fp8")
        for n in ("enorm", "hnorm", "norm"):
            out[f"{p}.{n}.weight"] = Spec((d,), "bf16")
        out[f"{p}.hc_head_fn"] = Spec((hc, hc * d), "fp32")
        out[f"{p}.hc_head_base"] = Spec((hc,), "fp32")
        out[f"{p}.hc_head_scale"] = Spec((1,), "fp32")
        out.update(_layer_inventory(cfg, p, ratios[L + k] if L + k < len(ratios) else 0, False))
    return out
