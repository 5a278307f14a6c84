"""HF import: the MTP layer's copies of the embedding and the output head.

A hub DeepSeek checkpoint stores, in each MTP layer ``model.layers.{L + k}``, its own ``embed_tokens.weight``
and ``shared_head.head.weight``. Our model shares one word embedding and one output head between the main
model and its MTP modules (DeepSeek-V3 shares them), so the importer keeps the main ones and drops the copies.
That is lossless only when the copies equal the main tensors. ``check_mtp_copies`` compares them, a block of
rows at a time (memory stays near one block), and

* ``policy="error"`` (default): a CheckpointError naming both tensors, the first differing row and the fix;
* ``policy="keep-main"`` (``tools/convert_ckpt.py --mtp-copy-mismatch keep-main``): a note (printed as a
  warning) saying which copies differ and that the main tensors were kept.

FP8 copies compare their raw values and their ``_scale_inv`` blocks (equal raw data with equal scales is the
same weight).
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch

from .errors import CheckpointError

POLICIES = ("error", "keep-main")
_ROWS = 4096


def _first_diff(hf, a: str, b: str) -> Optional[str]:
    """None when tensors ``a`` and ``b`` of the HF directory are equal, else a description of the first difference."""
    from safetensors import safe_open

    da, sa = hf.headers[a]
    db, sb = hf.headers[b]
    if tuple(sa) != tuple(sb) or da != db:
        return f"shape/dtype {tuple(sa)} {da} vs {tuple(sb)} {db}"
    with safe_open(os.path.join(hf.path, hf.weight_map[a]), framework="pt") as fa, \
            safe_open(os.path.join(hf.path, hf.weight_map[b]), framework="pt") as fb:
        xa, xb = fa.get_slice(a), fb.get_slice(b)
        if not sa:
            return None if torch.equal(fa.get_tensor(a).reshape(1).view(torch.uint8),
                                       fb.get_tensor(b).reshape(1).view(torch.uint8)) else "value"
        rows = sa[0]
        for r0 in range(0, rows, _ROWS):
            ta, tb = xa[r0:r0 + _ROWS].contiguous(), xb[r0:r0 + _ROWS].contiguous()
            if not torch.equal(ta.view(torch.uint8), tb.view(torch.uint8)):  # bits: NaN == NaN, FP8 works
                neq = (ta.view(torch.uint8) != tb.view(torch.uint8)).reshape(ta.shape[0], -1).any(dim=1).nonzero()
                row = r0 + int(neq[0])
                diff = (ta.float() - tb.float()).abs().max().item()
                return f"row {row} differs first, max |difference| {diff:.3g}"
    return None


def check_mtp_copies(hf, cfg, policy: str = "error") -> List[str]:
    """Compare every MTP layer's embed_tokens / shared_head.head with the main embedding / head (see module doc).
    Returns notes for the conversion report; raises CheckpointError under policy "error"."""
    if policy not in POLICIES:
        raise CheckpointError(f"--mtp-copy-mismatch {policy!r} is unknown; use {' or '.join(POLICIES)}")
    if not (hasattr(hf, "headers") and hasattr(hf, "weight_map")):
        return []  # a reader without per-name headers (V4's layout has no embed / head copies in its MTP layers)
    notes = []
    L = cfg.num_hidden_layers
    head = "lm_head.weight" if "lm_head.weight" in hf.headers else "model.embed_tokens.weight"
    for k in range(cfg.num_nextn_predict_layers):
        for copy, main in ((f"model.layers.{L + k}.embed_tokens.weight", "model.embed_tokens.weight"),
                           (f"model.layers.{L + k}.shared_head.head.weight", head)):
            if copy not in hf.headers or main not in hf.headers:
                continue
            why = _first_diff(hf, copy, main)
            if why is None and (copy + "_scale_inv" in hf.headers or main + "_scale_inv" in hf.headers):
                if copy + "_scale_inv" in hf.headers and main + "_scale_inv" in hf.headers:
                    why = _first_diff(hf, copy + "_scale_inv", main + "_scale_inv")
                    why = None if why is None else f"FP8 scales: {why}"
                else:
                    why = "only one of them has an FP8 scale"
            if why is None:
                continue
            if policy == "error":
                raise CheckpointError(
                    f"{hf.path}: the MTP copy {copy} differs from {main} ({why}); our model shares one embedding and "
                    f"head between the main model and MTP, so the copy would be lost - pass --mtp-copy-mismatch "
                    f"keep-main to convert with the main tensors (the MTP copy is dropped), or fix the checkpoint")
            notes.append(f"the MTP copy {copy} differs from {main} ({why}); kept {main} and dropped the copy "
                         f"(--mtp-copy-mismatch keep-main)")
    return notes
