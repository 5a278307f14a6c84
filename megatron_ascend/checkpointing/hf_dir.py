"""Reading and writing HuggingFace-style safetensors directories in any DeepSeek naming, with FP8 / FP4
dequantisation: the layer below the model-name mapping of hf.py.

``read_hf_dir(path) -> HFDir``
  config.json, the index (or a single ``model.safetensors``), every tensor's header, and ``tensors``: the
  directory's logical tensors under **canonical names** (for V2 / V3 / V3.2 the hub names; for V4
  transformers' names, v4_names.py) as ``Source`` records: file, on-disk name, logical shape, and for a
  quantised weight its scale and format. Checked before any data is read: shards present, index consistent,
  every V4 name known, every FP8 / FP4 weight paired with a scale of the right shape, no stray scale.
  ``HFDir.naming`` is the detected naming ('hf', 'hf-saved' or 'original'; V2 / V3 are always 'hf').

  Quantised weights (key on dtype and the scale's presence, not on names):
    * FP8: ``float8_e4m3fn`` weight + ``<name>_scale_inv`` (V3) or ``X.scale`` for ``X.weight`` (V4), fp32 or
      e8m0 scales, block from ``quantization_config.weight_block_size`` (default 128 x 128) -- fp8.py;
    * FP4: int8 / uint8 ``[out, in/2]`` (or ``float4_e2m1fn_x2``) weight + ``X.scale [out, in/32]`` e8m0 -- fp4.py.

``load_tensor(src, out_dtype=None)`` reads one Source (dequantised; default dtype bf16 for quantised sources,
the stored dtype otherwise). ``written_dtype(name, sources, save_dtype)`` is the one rule for the dtype a
converter writes. ``write_hf_shards(...)`` writes ``model-XXXXX-of-YYYYY.safetensors`` + index holding one
output shard in memory at a time, under the names a ``rename`` callable gives. ``fix_malloc_threshold()``: a
converting process's entry point calls it (tools/convert_ckpt.py, hf2ma's worker processes) so that memory
stays bounded by one tensor / shard; a process-wide setting, so the library functions leave it to the caller.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from . import fp4, fp8, v4_names
from .checkpoint import _write_text
from .dcp_io import CheckpointError

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu, "F4": torch.float4_e2m1fn_x2,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
_INT = ("I64", "I32", "I16", "I8", "U8", "BOOL")
_FP4_STORED = ("I8", "U8", "F4")
_SCALE_DTYPES = ("F8_E8M0", "U8", "F32", "BF16", "F16")
# tensors written in fp32 whatever --save-dtype says: the router bias, and V4's fp32 parameters (mHC mixing,
# attention sinks, compressor position biases), matched on canonical (HF) names
KEEP_FP32_SUFFIXES = ("e_score_correction_bias", ".sinks", ".position_bias")
KEEP_FP32_PARTS = (".attn_hc.", ".ffn_hc.", "hc_head.")


def fix_malloc_threshold(threshold: int = 128 * 1024) -> bool:
    """Pin glibc's mmap threshold for a converting process. glibc raises the threshold after each large free
    (up to 32 MiB), after which a conversion's many short-lived tensors (dequantisation temporaries above
    all) come from the heap, which fragments and is not given back: hf2ma of a random V4 release grew by
    +195 / +409 MiB for 1.5 / 2.7 GiB models, and by +68 MiB for both with the threshold pinned
    (bench/convert_memory.py). A pinned threshold keeps large buffers mmapped and returned on free. It holds
    for the rest of the process (call it from an entry point). Returns False (and changes nothing) off glibc."""
    import ctypes
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, int(threshold)))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def keep_fp32(name: str) -> bool:
    return name.endswith(KEEP_FP32_SUFFIXES) or any(p in name for p in KEEP_FP32_PARTS)


@dataclass
class Source:
    """One logical tensor of a HF directory."""

    name: str  # canonical
    key: str  # on-disk name
    file: str  # file name inside the directory
    dtype: str  # stored safetensors dtype of the weight
    shape: Tuple[int, ...]  # logical (dequantised) shape
    quant: Optional[str] = None  # None | 'fp8' | 'fp4'
    scale_key: Optional[str] = None
    scale_file: Optional[str] = None
    block: Optional[Tuple[int, int]] = None  # fp8 block; fp4: (1, 32)
    root: str = ""

    @property
    def is_int(self) -> bool:
        return self.quant is None and self.dtype in _INT

    @property
    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.quant else ST_DTYPES[self.dtype]


@dataclass
class HFDir:
    path: str
    config: Dict[str, Any]
    weight_map: Dict[str, str]  # on-disk tensor -> file name
    headers: Dict[str, Tuple[str, Tuple[int, ...]]]  # on-disk tensor -> (safetensors dtype, stored shape)
    tensors: Dict[str, Source] = field(default_factory=dict)  # canonical name -> Source
    naming: str = "hf"
    skipped: List[str] = field(default_factory=list)  # on-disk names deliberately not read (MTP duplicates)

    def file_of(self, name: str) -> str:
        return os.path.join(self.path, self.weight_map[name])

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "deepseek_v3")

    @property
    def quantised(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for s in self.tensors.values():
            if s.quant:
                out[s.quant] = out.get(s.quant, 0) + 1
        return out

    def describe(self) -> str:
        q = self.quantised
        fmt = ", ".join(f"{n} {k.upper()}" for k, n in sorted(q.items())) or "no quantised"
        return f"{self.path}: {len(self.tensors)} tensors in the {self.naming!r} naming ({fmt} weights)"


def _fp8_block(config: Dict[str, Any]) -> Tuple[int, int]:
    qc = config.get("quantization_config") or {}
    b = qc.get("weight_block_size")
    if b is None:
        return (fp8.BLOCK, fp8.BLOCK)
    try:
        return fp8.block_shape(b)
    except (TypeError, ValueError):
        raise CheckpointError(f"config.json quantization_config.weight_block_size {b!r} is not two positive sizes")


def _scale_of(name: str, names) -> Optional[str]:
    """The scale tensor paired with weight ``name``, if any."""
    if name + "_scale_inv" in names:
        return name + "_scale_inv"
    if name.endswith(".weight") and name[: -len(".weight")] + ".scale" in names:
        return name[: -len(".weight")] + ".scale"
    return None


def read_hf_dir(path: str) -> HFDir:
    from safetensors import safe_open

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path} has no config.json; --load-dir must be a HuggingFace model directory")
    with open(cfg_path) as f:
        config = json.load(f)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = dict(json.load(f)["weight_map"])
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        weight_map = None
    else:
        raise CheckpointError(f"{path} has neither model.safetensors.index.json nor model.safetensors")
    files = sorted(set(weight_map.values())) if weight_map is not None else ["model.safetensors"]
    missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise CheckpointError(f"{path}: shard file(s) {', '.join(missing[:3])} listed in the index are missing; "
                              f"download the complete checkpoint")
    headers, found = {}, {}
    for fn in files:
        with safe_open(os.path.join(path, fn), framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                headers[k] = (sl.get_dtype(), tuple(sl.get_shape()))
                found[k] = fn
    if weight_map is None:
        weight_map = found
    absent = sorted(k for k, fn in weight_map.items() if found.get(k) != fn)
    if absent:
        raise CheckpointError(f"{path}: {len(absent)} tensor(s) listed in the index are not in their shard file, "
                              f"e.g. {absent[0]} (in {weight_map[absent[0]]}); the shard is truncated or wrong")
    hf = HFDir(path, config, weight_map, headers)
    _build_view(hf)
    return hf


def _build_view(hf: HFDir) -> None:
    """Fill hf.tensors / naming / skipped, checking names, scales and quantised shapes."""
    v4 = hf.model_type == "deepseek_v4"
    names = set(hf.headers)
    scales = {}
    for n in sorted(names):
        s = _scale_of(n, names)
        if s is not None:
            scales[n] = s
    used_scales = set(scales.values())
    if v4:
        try:
            hf.naming = v4_names.detect_naming(n for n in names if n not in used_scales)
        except v4_names.UnknownName as e:
            raise CheckpointError(f"{hf.path}: {e}")
    block = _fp8_block(hf.config)
    unknown, bad, stray = [], [], []
    by_canon: Dict[str, str] = {}
    for n in sorted(names):
        if n in used_scales:
            continue
        if n.endswith("_scale_inv"):
            stray.append(f"{n} (no {n[: -len('_scale_inv')]})")
            continue
        if v4:
            try:
                c = v4_names.canonical_name(n)
            except v4_names.UnknownName:
                if n.endswith(".scale"):
                    stray.append(f"{n} (no {n[: -len('.scale')]}.weight)")
                else:
                    unknown.append(n)
                continue
            if c is None:
                hf.skipped.append(n)
                continue
        else:
            c = n
        if c in by_canon:
            raise CheckpointError(f"{hf.path}: {by_canon[c]} and {n} are the same tensor ({c}) in two namings; "
                                  f"convert from one consistent checkpoint")
        by_canon[c] = n
        st, shape = hf.headers[n]
        src = Source(c, n, hf.weight_map[n], st, shape, root=hf.path)
        sc = scales.get(n)
        if sc is not None:
            sdt, sshape = hf.headers[sc]
            src.scale_key, src.scale_file = sc, hf.weight_map[sc]
            if sdt not in _SCALE_DTYPES:
                bad.append(f"{sc} is stored as {sdt}; a block scale must be e8m0 (F8_E8M0 / U8) or a float")
            elif st == "F8_E4M3":
                src.quant, src.block = "fp8", block
                want = fp8.expected_scale_shape(shape, block) if len(shape) == 2 else None
                if want is None or tuple(sshape) != want:
                    bad.append(f"{sc} {tuple(sshape)} for FP8 weight {n} {shape} (expected {want}: "
                               f"{block[0]}x{block[1]} blocks from quantization_config.weight_block_size)")
            elif st in _FP4_STORED and len(shape) == 2:
                logical = shape if st == "F4" else (shape[0], 2 * shape[1])
                src.quant, src.block, src.shape = "fp4", (1, fp4.BLOCK), logical
                want = fp4.expected_scale_shape(logical)
                if logical[1] % fp4.BLOCK or tuple(sshape) != want:
                    bad.append(f"{sc} {tuple(sshape)} for FP4 weight {n} (stored {shape}, logical {logical}; "
                               f"expected {want}: 1x{fp4.BLOCK} blocks along the input dim)")
            else:
                bad.append(f"{n} has a block scale {sc} but is stored as {st} {shape}, which is neither FP8 "
                           f"e4m3 nor packed FP4 e2m1")
        elif st == "F8_E4M3":
            want = (n[: -len(".weight")] + ".scale") if (v4 and n.endswith(".weight")) else n + "_scale_inv"
            bad.append(f"{n} is float8_e4m3fn but its block scale {want} is missing; FP8 weights need their scales")
        elif st == "F4" or (v4 and st in ("I8", "U8") and n.endswith(".weight")):
            bad.append(f"{n} is packed FP4 ({st}) but its scale {n[: -len('.weight')]}.scale is missing; FP4 "
                       f"weights need their e8m0 scales")
        hf.tensors[c] = src
    if unknown:
        raise CheckpointError(f"{hf.path}: {len(unknown)} tensor(s) are no DeepSeek-V4 tensor in DeepSeek's or "
                              f"transformers' naming, e.g. {', '.join(unknown[:4])}; check that the directory is "
                              f"a V4 checkpoint and config.json's model_type")
    if stray:
        raise CheckpointError(f"{hf.path}: {len(stray)} scale tensor(s) without their weight, e.g. "
                              f"{', '.join(stray[:3])}; a shard may be incomplete")
    if bad:
        raise CheckpointError(f"{hf.path}: {len(bad)} quantised tensor(s) cannot be dequantised: {'; '.join(bad[:3])}")


def load_tensor(src: Source, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The logical tensor of ``src``, dequantised when stored as FP8 / FP4, in ``out_dtype`` (default
    ``src.default_dtype``)."""
    from safetensors import safe_open

    out_dtype = out_dtype or src.default_dtype
    with safe_open(os.path.join(src.root, src.file), framework="pt") as f:
        t = f.get_tensor(src.key)
    if src.quant is None:
        return t.to(out_dtype)
    with safe_open(os.path.join(src.root, src.scale_file), framework="pt") as f:
        s = f.get_tensor(src.scale_key)
    values = fp8.scale_values(s)
    if not bool(torch.isfinite(values).all()):
        raise CheckpointError(f"{src.scale_key} holds a non-finite scale (e8m0 byte 255 is NaN); the checkpoint is "
                              f"damaged")
    if src.quant == "fp8":
        return fp8.dequantize_blocks(t, values, out_dtype=out_dtype, block=src.block)
    return fp4.dequantize_fp4(t, values, out_dtype=out_dtype)


def written_dtype(name: str, sources: Iterable[Source], save_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype a converter writes for canonical tensor ``name`` read from ``sources``: integers (V4's
    ``tid2eid``) as int64 always; keep_fp32 tensors as fp32; else ``save_dtype``; else bf16 for quantised
    sources; else the stored dtype."""
    sources = list(sources)
    if any(s.is_int for s in sources):
        return torch.int64
    if keep_fp32(name):
        return torch.float32
    if save_dtype is not None:
        return save_dtype
    if any(s.quant for s in sources):
        return torch.bfloat16
    return ST_DTYPES[sorted(s.dtype for s in sources)[0]]


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def write_hf_shards(out_dir: str, items: Sequence[Tuple[str, Tuple[int, ...], torch.dtype]],
                    materialize: Callable[[Sequence[Tuple[str, Tuple[int, ...], torch.dtype]]],
                                          Dict[str, torch.Tensor]],
                    max_shard_bytes: int, rename: Callable[[str], str] = lambda n: n,
                    bar=None) -> Dict[str, Any]:
    """Write ``items`` ``[(canonical name, shape, dtype)]`` in order as safetensors shards of at most
    ``max_shard_bytes`` (a larger tensor gets a shard of its own). ``materialize(shard_items)`` returns the
    shard's tensors by canonical name; only one shard is in memory at a time. Returns
    {shards, bytes, largest_shard_bytes, weight_map}."""
    from safetensors.torch import save_file

    written = [rename(n) for n, _, _ in items]
    dup = sorted({w for w in written if written.count(w) > 1})
    if dup:
        raise CheckpointError(f"two tensors would be written as {dup[0]}; the naming cannot express this model")
    shards, cur, cur_bytes = [], [], 0
    for it in items:
        nb = _nbytes(it[1], it[2])
        if cur and cur_bytes + nb > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(it)
        cur_bytes += nb
    if cur:
        shards.append(cur)
    os.makedirs(out_dir, exist_ok=True)
    n = len(shards)
    weight_map, total, largest = {}, 0, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
        got = materialize(shard)
        tensors = {}
        for name, shape, dtype in shard:
            t = got.pop(name)
            if tuple(t.shape) != tuple(shape):
                raise CheckpointError(f"{name}: got shape {tuple(t.shape)}, planned {tuple(shape)}")
            tensors[rename(name)] = t.to(dtype).contiguous()
        del got
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        largest = max(largest, nbytes)
        save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
        for k in tensors:
            weight_map[k] = fname
        total += nbytes
        if bar is not None:
            bar.update(len(shard))
        del tensors
    if n > 1:
        _write_text(os.path.join(out_dir, "model.safetensors.index.json"),
                    json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return {"shards": n, "bytes": total, "largest_shard_bytes": largest, "weight_map": weight_map}
