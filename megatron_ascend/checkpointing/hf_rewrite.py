"""HuggingFace directory -> HuggingFace directory: dequantise FP8 / FP4 and rename, streaming, without our model.

``convert_hf_to_hf(src_dir, out_dir, naming='hf', save_dtype=None, max_shard_bytes=...)`` reads a directory in
any naming (hf_dir.read_hf_dir), checks a V4 directory against the release inventory of its config.json
(v4_names.release_inventory: every tensor known, of the right shape, none missing), and writes every tensor
dequantised (bf16 by default; ``save_dtype`` 'fp32' / 'bf16' / 'fp16'; integers and the fp32 parameters as
hf_dir.written_dtype says) under ``naming`` ('hf': transformers' save_pretrained names, 'original':
DeepSeek's; V4 only), one output shard in memory at a time. config.json is copied without its ``quantization_config`` / ``expert_dtype``; tokenizer
and generation files are copied. The directory appears complete or not at all (written as ``<out>.tmp``,
then renamed). Use: turn DeepSeek's FP8 / FP4 release into a bf16 directory transformers loads on any device,
or rename between the namings.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..config import ConfigError, ModelConfig
from . import v4_names
from .checkpoint import _write_text
from .dcp_io import CheckpointError
from .hf_dir import HFDir, Source, load_tensor, read_hf_dir, write_hf_shards, written_dtype

SIDECARS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
            "generation_config.json")
_FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_MTP = re.compile(r"^mtp\.(\d+)\.")


def _natural(name: str):
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", name)]


def hub_order(name: str):
    """Embedding, layers by index, the other model-level tensors, then the MTP modules."""
    m, t = _LAYER.match(name), _MTP.match(name)
    group = 0 if name.startswith("model.embed") else 1 if m else 3 if t else 2
    return (group, int((m or t).group(1)) if (m or t) else 0, _natural(name))


Item = Tuple[str, Tuple[int, ...], Source, Callable[[torch.Tensor], torch.Tensor]]


def _items(hf: HFDir) -> List[Item]:
    """[(canonical out name, shape, source, slice of the source tensor)]; fused experts split per expert."""
    out: List[Item] = []
    for name, src in hf.tensors.items():
        m = _FUSED.match(name)
        if not m:
            out.append((name, src.shape, src, lambda t: t))
            continue
        prefix, part = m.groups()
        E = src.shape[0]
        if part == "down_proj":
            for e in range(E):
                out.append((f"{prefix}.{e}.down_proj.weight", src.shape[1:], src, lambda t, e=e: t[e]))
        else:
            half = src.shape[1] // 2
            for e in range(E):
                out.append((f"{prefix}.{e}.gate_proj.weight", (half, src.shape[2]), src, lambda t, e=e: t[e, :half]))
                out.append((f"{prefix}.{e}.up_proj.weight", (half, src.shape[2]), src, lambda t, e=e: t[e, half:]))
    return sorted(out, key=lambda it: hub_order(it[0]))


def check_v4_inventory(hf: HFDir, items: List[Item]) -> Tuple[ModelConfig, List[str]]:
    """Every tensor of a V4 directory against the release inventory of its config.json. Returns the config
    used (without MTP when the directory has none) and notes."""
    cfg = ModelConfig.from_hf_dict(hf.config)
    notes = []
    has_mtp = any(n.startswith("mtp.") for n, *_ in items)
    if cfg.num_nextn_predict_layers and not has_mtp:
        notes.append(f"{hf.path} has no MTP module (mtp.*; transformers drops it on save): written without it")
        cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    want = {v4_names.canonical_name(k): spec.shape for k, spec in v4_names.release_inventory(cfg).items()}
    got = {n: tuple(shape) for n, shape, *_ in items}
    unknown = [hf.tensors[n].key if n in hf.tensors else n for n in got if n not in want]
    wrong = [f"{n} {got[n]} (expected {want[n]})" for n in got if n in want and got[n] != want[n]]
    missing = [n for n in want if n not in got]
    if unknown:
        raise CheckpointError(f"{hf.path}: {len(unknown)} tensor(s) are not in a DeepSeek-V4 checkpoint for this "
                              f"config.json, e.g. {', '.join(unknown[:4])}; check num_hidden_layers, compress_ratios "
                              f"/ layer_types, num_hash_layers and n_routed_experts")
    if wrong:
        raise CheckpointError(f"{hf.path}: {len(wrong)} tensor(s) have the wrong shape for config.json: "
                              f"{'; '.join(wrong[:3])}")
    if missing:
        raise CheckpointError(f"{hf.path}: {len(missing)} tensor(s) of a DeepSeek-V4 checkpoint are missing, e.g. "
                              f"{', '.join(missing[:4])}; a shard may be missing or config.json may not match")
    return cfg, notes


def convert_hf_to_hf(src_dir: str, out_dir: str, naming: str = "hf", save_dtype: Optional[str] = None,
                     max_shard_bytes: int = 5 * 2 ** 30, progress: bool = True) -> Dict[str, Any]:
    """Returns a report dict (tensors, shards, bytes, largest shard, peak RSS, the naming read, notes, path)."""
    from .hf import _bar, _disk_namer, _dtype, peak_rss_bytes  # the converters' shared helpers

    save_dtype = _dtype(save_dtype)

    if os.path.abspath(src_dir) == os.path.abspath(out_dir):
        raise ConfigError("--save-dir must differ from --load-dir (the source is read while writing)")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ConfigError(f"--save-dir {out_dir} is not empty; pick a new directory (nothing is overwritten)")
    hf = read_hf_dir(src_dir)
    rename = _disk_namer(hf.model_type, naming)
    items = _items(hf)
    notes = [hf.describe()]
    if hf.skipped:
        notes.append(f"skipped {len(hf.skipped)} MTP duplicate(s) of the embedding / head, e.g. {hf.skipped[0]}")
    if hf.model_type == "deepseek_v4":
        _, more = check_v4_inventory(hf, items)
        notes += more
    by_src: Dict[str, List[Source]] = {}
    for n, _, src, _ in items:
        by_src.setdefault(n, []).append(src)
    dtypes = {n: written_dtype(n, by_src[n], save_dtype) for n, *_ in items}
    plan = {n: (src, cut) for n, _, src, cut in items}

    def materialize(shard):
        loaded: Dict[int, torch.Tensor] = {}  # each source read once per shard (fused experts)
        out = {}
        for n, _, dtype in shard:
            src, cut = plan[n]
            if id(src) not in loaded:
                loaded[id(src)] = load_tensor(src, dtype if src.quant or src.is_int else None)
            out[n] = cut(loaded[id(src)]).to(dtype)
        return out

    tmp = out_dir.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    bar = _bar(len(items), "hf2hf") if progress else None
    rep = write_hf_shards(tmp, [(n, tuple(shape), dtypes[n]) for n, shape, *_ in items], materialize,
                          max_shard_bytes, rename=rename, bar=bar)
    if bar is not None:
        bar.close()
    cfg = {k: v for k, v in hf.config.items() if k not in ("quantization_config", "expert_dtype")}
    floats = sorted({str(d).replace("torch.", "") for d in dtypes.values() if d.is_floating_point})
    cfg["torch_dtype"] = "bfloat16" if "bfloat16" in floats else floats[0]
    if "dtype" in cfg:
        cfg["dtype"] = cfg["torch_dtype"]
    _write_text(os.path.join(tmp, "config.json"), json.dumps(cfg, indent=2))
    for fn in SIDECARS:
        if os.path.isfile(os.path.join(src_dir, fn)):
            shutil.copy2(os.path.join(src_dir, fn), os.path.join(tmp, fn))
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty (checked above)
    os.replace(tmp, out_dir)
    return {"tensors": len(items), "shards": rep["shards"], "bytes": rep["bytes"],
            "largest_shard_bytes": rep["largest_shard_bytes"], "peak_rss_bytes": peak_rss_bytes(),
            "naming_read": hf.naming, "notes": notes, "path": out_dir}
