"""HuggingFace DeepSeek (V2 / V2-Lite / V3 / V3.2 / V4) safetensors <-> our sharded checkpoint, streaming.

Directories are read and written through hf_dir.py (canonical names, FP8 / FP4 dequantisation, the sharded
writer); V4's namings are v4_names.py's. This module maps canonical names to our model's.

``convert_hf_to_ma(hf_dir, save_dir, tp, pp, ep, vp=None, save_dtype=None, workers=1)``
  reads config.json and the (sharded) safetensors, checks every name / shape against our model (built on the
  meta device: no memory), dequantises FP8 blocks (fp8.py), and writes a checkpoint in the format of
  checkpoint.py under ``<save_dir>/release`` (tracker "release"). Each HF tensor becomes one box of one of
  our global tensors (a per-expert ``experts.{e}.gate_proj.weight`` is box ``[e:e+1]`` of our grouped
  ``experts.gate_proj [E, I, h]``), read lazily when DCP writes it, so memory stays near one tensor.
  ``workers > 1`` writes with that many processes (a gloo world on this machine; each takes whole HF files).

  Our checkpoint is in global coordinates, so it is not cut for one layout: T / P / E (/ V) are validated
  against the model (config.validate_all: heads, experts, layers must divide) and recorded in common.json
  as ``converted_for_layout``; ``--load`` / ``--finetune`` at that or any other valid layout reads it.

``convert_ma_to_hf(ckpt_dir, hf_dir, save_dtype=None, max_shard_bytes=..., naming='hf')``
  writes config.json (ModelConfig.to_hf_dict), ``model-XXXXX-of-YYYYY.safetensors`` and
  ``model.safetensors.index.json``, with the hub's names: per-expert 2-D expert weights, the MTP layers as
  ``model.layers.{num_hidden_layers + k}`` including their ``embed_tokens`` / ``shared_head.head`` duplicates,
  and the router bias. One output shard is in memory at a time. V4: ``naming`` 'hf' (transformers'
  save_pretrained names) or 'original' (DeepSeek's).

Name mapping: megatron_ascend/models/deepseek/hf_names.py (the model package's), used in both directions.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import resource
from dataclasses import dataclass
from unittest import mock
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..config import ConfigError, ModelConfig, ParallelConfig, validate_all
from .checkpoint import (FORMAT, FORMAT_VERSION, _to_json, _write_text, commit_checkpoint, find_checkpoint,
                         prepare_tmp, read_common)
from .dcp_io import Chunk, CheckpointError, read_chunks, tensor_index, write_chunks
from . import v4_names
from .hf_dir import (HFDir, Source, fix_malloc_threshold, keep_fp32, load_tensor,  # noqa: F401 (re-exported)
                     read_hf_dir, write_hf_shards, written_dtype)
from .hf_mtp_copies import check_mtp_copies

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "float32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16}
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _dtype(name: Optional[str]):
    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(f"--save-dtype {name!r} is unknown; use fp32, bf16 or fp16")
    return DTYPES[name]


def peak_rss_bytes(children: bool = False) -> int:
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss * 1024


@functools.lru_cache(maxsize=8)
def expected_tensors(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Global shapes of every tensor our single-process model holds (built on the meta device, without
    running its initialisation, which would only draw meta numbers)."""
    from ..models import model_class

    cls = model_class(cfg)
    with torch.device("meta"), mock.patch.object(cls, "init_weights", lambda self, seed: None):
        model = cls(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- hf -> ma
@dataclass
class Piece:
    """One HF tensor (or half of a fused gate_up) as a box of one of our tensors."""

    ma: str
    offsets: Tuple[int, ...]
    shape: Tuple[int, ...]  # box size in our tensor
    hf: str
    file: str
    rows: Optional[Tuple[int, int]] = None  # dim-1 rows of a fused [E, 2I, h] gate_up_proj
    src: Optional[Source] = None  # what to read (hf_dir.Source: file, on-disk name, scale / quantisation)
    expert: bool = False
    dtype: torch.dtype = torch.float32  # written dtype
    nbytes: int = 0


def plan_hf_to_ma(hf: HFDir, cfg: ModelConfig, save_dtype=None) -> Tuple[List[Piece], ModelConfig, List[str]]:
    """Every piece to copy, after checking names and shapes. Returns (pieces, config used, notes)."""
    from ..models.deepseek.hf_names import ma_name_for

    notes = []
    L = cfg.num_hidden_layers
    if cfg.model_type == "deepseek_v4":  # hf_dir's canonical MTP names
        has_mtp, where = any(n.startswith("mtp.") for n in hf.tensors), "mtp.0.*"
    else:
        has_mtp, where = any(int(m.group(1)) >= L for m in map(_LAYER.match, hf.tensors) if m), f"model.layers.{L}.*"
    if cfg.num_nextn_predict_layers and not has_mtp:
        notes.append(f"{hf.path} has no MTP layer ({where}; transformers drops it on save): converted "
                     f"without MTP (num_nextn_predict_layers 0)")
        cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    expected = expected_tensors(cfg)
    pieces: List[Piece] = []
    unknown, wrong = [], []
    I = cfg.moe_intermediate_size
    for name in sorted(hf.tensors):
        source = hf.tensors[name]
        shape = source.shape
        r = ma_name_for(name, cfg)
        if r is None:
            continue  # MTP duplicates of the embedding / head
        ma, e, part = r
        if ma not in expected:
            unknown.append(name)
            continue
        want = expected[ma]
        kw = dict(hf=name, file=source.file, src=source, expert=".mlp.experts." in ma)
        if e is not None:
            if shape != want[1:] or e >= want[0]:
                wrong.append(f"{name} {shape} (expected {want[1:]} for expert {e} of {want[0]})")
                continue
            pieces.append(Piece(ma, (e,) + (0,) * (len(want) - 1), (1,) + shape, **kw))
        elif part == "gate_up":
            if shape != (want[0], 2 * I, want[2]):
                wrong.append(f"{name} {shape} (expected {(want[0], 2 * I, want[2])})")
                continue
            up = ma[: -len("gate_proj")] + "up_proj"
            pieces.append(Piece(ma, (0, 0, 0), want, rows=(0, I), **kw))
            pieces.append(Piece(up, (0, 0, 0), want, rows=(I, 2 * I), **kw))
        else:
            if shape != want:
                wrong.append(f"{name} {shape} (expected {want})")
                continue
            pieces.append(Piece(ma, (0,) * len(want), want, **kw))
    if unknown:
        raise CheckpointError(f"{len(unknown)} HF tensor(s) have no counterpart in our {cfg.model_type} model, e.g. "
                              f"{', '.join(unknown[:4])}; check that config.json matches the weights")
    if wrong:
        raise CheckpointError(f"{len(wrong)} HF tensor(s) have the wrong shape: {'; '.join(wrong[:3])}; check "
                              f"that config.json matches the weights")
    covered: Dict[str, int] = {}
    for p in pieces:
        covered[p.ma] = covered.get(p.ma, 0) + math.prod(p.shape)
    missing = [k for k, s in expected.items() if covered.get(k, 0) != math.prod(s)]
    if missing:
        detail = [f"{k} ({covered.get(k, 0)} of {math.prod(expected[k])} elements)" for k in missing[:4]]
        raise CheckpointError(f"{len(missing)} of our tensors are not (fully) present in {hf.path}: "
                              f"{', '.join(detail)}; a shard may be missing or config.json may not match")
    # one written dtype per tensor
    srcs: Dict[str, List[Source]] = {}
    for p in pieces:
        srcs.setdefault(p.ma, []).append(p.src)
    for p in pieces:
        p.dtype = written_dtype(p.hf, srcs[p.ma], save_dtype)
        p.nbytes = math.prod(p.shape) * torch.empty((), dtype=p.dtype).element_size()
    return pieces, cfg, notes


def _load_piece(root: str, p: Piece) -> torch.Tensor:
    t = load_tensor(p.src, out_dtype=p.dtype)
    if p.rows is not None:
        t = t[:, p.rows[0]:p.rows[1]]
    if len(t.shape) + 1 == len(p.shape):
        t = t.unsqueeze(0)
    return t.to(p.dtype).contiguous()


def _chunks_for(root: str, pieces: Sequence[Piece], expected_shape: Dict[str, Tuple[int, ...]], bar=None) -> List[Chunk]:
    out = []
    for p in pieces:
        def loader(p=p):
            t = _load_piece(root, p)
            if bar is not None:
                bar.update(1)
            return t
        out.append(Chunk(p.ma, expected_shape[p.ma], p.offsets, loader=loader, shape=p.shape, dtype=p.dtype))
    return out


def _assign(pieces: Sequence[Piece], workers: int) -> List[List[Piece]]:
    """Whole HF files per worker, balanced by bytes (a file is read by one process)."""
    by_file: Dict[str, List[Piece]] = {}
    for p in pieces:
        by_file.setdefault(p.file, []).append(p)
    loads = [0] * workers
    out: List[List[Piece]] = [[] for _ in range(workers)]
    for fn, ps in sorted(by_file.items(), key=lambda kv: -sum(p.nbytes for p in kv[1])):
        w = loads.index(min(loads))
        out[w] += ps
        loads[w] += sum(p.nbytes for p in ps)
    return out


def _worker(rank, workers, store, root, tmp, assigned, shapes, progress):
    import torch.distributed as dist
    torch.set_num_threads(1)
    fix_malloc_threshold()  # a process of our own (hf_dir.fix_malloc_threshold)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=workers)
    try:
        bar = _bar(len(assigned[rank]), f"hf2ma worker {rank}", rank) if progress else None
        write_chunks(tmp, _chunks_for(root, assigned[rank], shapes, bar), streaming=True)
        if bar is not None:
            bar.close()
    finally:
        dist.destroy_process_group()


def _bar(total, desc, position=0):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tensor", position=position, leave=True, dynamic_ncols=True)


def convert_hf_to_ma(hf_dir: str, save_dir: str, tp: int = 1, pp: int = 1, ep: int = 1, vp: Optional[int] = None,
                     save_dtype: Optional[str] = None, workers: int = 1, progress: bool = True,
                     mtp_copies: str = "error") -> Dict[str, Any]:
    """Convert; returns a report dict (tensor count, bytes, largest tensor / file, peak RSS).
    mtp_copies: "error" | "keep-main" when an MTP layer's embed_tokens / shared_head.head differ from the main
    ones (hf_mtp_copies.py)."""
    dtype = _dtype(save_dtype)
    hf = read_hf_dir(hf_dir)
    cfg = ModelConfig.from_hf_dict(hf.config)
    # a layout for validation: etp 1 (DeepSeek recipes) and the smallest dp that lets ep fit in a stage
    dp = ep // math.gcd(ep, tp)
    par = ParallelConfig(world_size=tp * pp * dp, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                         expert_model_parallel_size=ep, expert_tensor_parallel_size=1,
                         num_layers_per_virtual_pipeline_stage=vp)
    validate_all(cfg, par)
    pieces, cfg, notes = plan_hf_to_ma(hf, cfg, dtype)
    notes += check_mtp_copies(hf, cfg, mtp_copies)
    for n in notes:
        logger.warning(n)
    shapes = expected_tensors(cfg)
    tmp = prepare_tmp(save_dir, "release")
    if workers <= 1:
        bar = _bar(len(pieces), "hf2ma") if progress else None
        write_chunks(tmp, _chunks_for(hf.path, pieces, shapes, bar), streaming=True)
        if bar is not None:
            bar.close()
    else:
        import tempfile
        import torch.multiprocessing as mp
        store = os.path.join(tempfile.mkdtemp(prefix="hf2ma_"), "store")
        mp.start_processes(_worker, args=(workers, store, hf.path, tmp, _assign(pieces, workers), shapes, progress),
                           nprocs=workers, join=True, start_method="spawn")
    common = {"format": FORMAT, "format_version": FORMAT_VERSION, "iteration": 0, "release": True,
              "layout": None, "has_optimizer": False, "has_rng": False, "optimizer": None, "scheduler": None,
              "extra_state": {}, "model_config": dataclasses.asdict(cfg), "converted_from": os.path.abspath(hf_dir),
              "converted_for_layout": {"tp": tp, "pp": pp, "ep": ep, "vp": vp}}
    final = commit_checkpoint(save_dir, "release", tmp, _to_json(common))
    file_sizes = {fn: os.path.getsize(os.path.join(hf.path, fn)) for fn in set(hf.weight_map.values())}
    return {"tensors": len(pieces), "bytes": sum(p.nbytes for p in pieces),
            "largest_tensor_bytes": max(p.nbytes for p in pieces), "largest_file_bytes": max(file_sizes.values()),
            "peak_rss_bytes": peak_rss_bytes(), "peak_rss_children_bytes": peak_rss_bytes(children=True),
            "notes": notes, "path": final}


# ---------------------------------------------------------------------------------------------- ma -> hf
def _natural(name: str):
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", name)]


def hf_layout(cfg: ModelConfig, stored: Dict[str, Tuple[Tuple[int, ...], torch.dtype]]):
    """[(hf name, our name, box offsets, box shape, hf shape)] in hub order."""
    from ..models.deepseek.hf_names import hf_names_for

    L = cfg.num_hidden_layers
    out = []
    names = [k for k in stored if "/" not in k]  # not optimizer/ or rng/
    for ma in sorted(names, key=_natural):
        shape, _ = stored[ma]
        if ma == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        hf_names = hf_names_for(ma, cfg)
        if ".mlp.experts." in ma and len(hf_names) > 1:
            for e, hn in enumerate(hf_names[1:]):
                out.append((hn, ma, (e,) + (0,) * (len(shape) - 1), (1,) + shape[1:], shape[1:]))
        else:
            out.append((hf_names[0], ma, (0,) * len(shape), shape, shape))
    for k in range(cfg.num_nextn_predict_layers if cfg.model_type != "deepseek_v4" else 0):  # V3 hub copies
        for dup, src in (("embed_tokens.weight", "model.embed_tokens.weight"),
                         ("shared_head.head.weight", "lm_head.weight")):
            if src in stored:
                shape = stored[src][0]
                out.append((f"model.layers.{L + k}.{dup}", src, (0,) * len(shape), shape, shape))

    def order(item):
        m = _LAYER.match(item[0])
        return (0 if item[0].startswith("model.embed") else 1 if m else 2, int(m.group(1)) if m else 0,
                _natural(item[0]))
    return sorted(out, key=order)


def _disk_namer(model_type: str, naming: str):
    """canonical HF name -> written name for ``--save-naming`` (DeepSeek's original naming exists for V4 only)."""
    if naming not in v4_names.NAMINGS:
        raise ConfigError(f"--save-naming {naming!r} is unknown; use one of {', '.join(v4_names.NAMINGS)}")
    if model_type == "deepseek_v4":
        def rename(n):
            try:
                return v4_names.disk_name(n, naming)
            except v4_names.UnknownName as e:
                raise CheckpointError(f"cannot write {n} in the {naming!r} naming: {e}")
        return rename
    if naming != "hf":
        raise ConfigError(f"--save-naming {naming} is for DeepSeek-V4 checkpoints; {model_type} has one naming "
                          f"(the hub's): drop the flag")
    return lambda n: n


def convert_ma_to_hf(ckpt_dir: str, hf_dir: str, save_dtype: Optional[str] = None,
                     max_shard_bytes: int = 5 * 2 ** 30, progress: bool = True,
                     model_config: Optional[ModelConfig] = None, naming: str = "hf") -> Dict[str, Any]:
    dtype = _dtype(save_dtype)
    path, _ = find_checkpoint(ckpt_dir)
    if path is None:
        raise CheckpointError(f"{ckpt_dir} holds no checkpoint; pass the --save directory of a run (or one "
                              f"iter_XXXXXXX directory)")
    common = read_common(path)
    if model_config is None:
        if not common.get("model_config"):
            raise CheckpointError(f"{path}/common.json records no model config; pass --model-config config.json")
        model_config = ModelConfig(**common["model_config"])
    cfg = model_config
    rename = _disk_namer(cfg.model_type, naming)
    stored = tensor_index(path)
    layout = hf_layout(cfg, stored)
    out_dtype, where = {}, {}
    for hn, ma, off, box, hshape in layout:
        src = stored[ma][1]
        keep = dtype is None or keep_fp32(hn) or not src.is_floating_point
        out_dtype[hn] = src if keep else dtype
        where[hn] = (ma, off, box)

    def materialize(shard):
        targets, chunks = {}, []
        for hn, _, _ in shard:
            ma, off, box = where[hn]
            t = torch.empty(box, dtype=stored[ma][1])
            chunks.append(Chunk(ma, stored[ma][0], off, t))
            targets[hn] = t
        read_chunks(path, chunks)
        return {hn: targets[hn].reshape(shape) for hn, shape, _ in shard}

    bar = _bar(len(layout), "ma2hf") if progress else None
    rep = write_hf_shards(hf_dir, [(hn, hshape, out_dtype[hn]) for hn, _, _, _, hshape in layout], materialize,
                          max_shard_bytes, rename=rename, bar=bar)
    if bar is not None:
        bar.close()
    hf_cfg = cfg.to_hf_dict()
    dtypes = {str(d).replace("torch.", "") for d in out_dtype.values() if d.is_floating_point}
    hf_cfg["torch_dtype"] = "bfloat16" if "bfloat16" in dtypes else sorted(dtypes)[0]
    _write_text(os.path.join(hf_dir, "config.json"), json.dumps(hf_cfg, indent=2))
    return {"tensors": len(layout), "shards": rep["shards"], "bytes": rep["bytes"],
            "largest_shard_bytes": rep["largest_shard_bytes"], "peak_rss_bytes": peak_rss_bytes()}
