#!/usr/bin/env python
"""Check (and optionally rewrite) a megatron_ascend checkpoint for another TP / PP / EP layout, offline.

A checkpoint stores global tensors (torch.distributed.checkpoint boxes in global coordinates), so resharding
needs no rewrite: start the job at the new layout with ``--load`` and every rank reads the parts it needs
(tests/test_checkpoint.py: TP2 PP2 EP2 DP2 on 8 ranks <-> TP1 EP4 on 4 ranks, bitwise; with the real model,
tests/test_checkpoint_model.py). This tool checks that beforehand, without processes:

    python tools/reshard.py --load-dir ckpt/run --tensor-model-parallel-size 4 \
        --pipeline-model-parallel-size 8 --expert-model-parallel-size 16 [--world-size 512]

* validates the recorded model config against the layout (config.validate_all: heads / experts / layers);
* checks that every tensor the model holds is stored with the model's global shape and fully covered.

``--save-dir OUT`` also rewrites the checkpoint, one tensor in memory at a time, with each tensor as a
single box (fewer, larger reads for the new layout), optionally ``--save-dtype`` for the model weights and
``--drop-optimizer`` / ``--drop-rng``. The new directory records the target layout as ``resharded_for``.
"""
import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_ascend.arguments import exit_on_config_error  # noqa: E402
from megatron_ascend.checkpointing import CheckpointError, find_checkpoint, read_common  # noqa: E402
from megatron_ascend.checkpointing.checkpoint import commit_checkpoint, prepare_tmp  # noqa: E402
from megatron_ascend.checkpointing.hf import DTYPES, keep_fp32  # noqa: E402
from megatron_ascend.checkpointing.dcp_io import Chunk, read_chunks, read_metadata, write_chunks  # noqa: E402
from megatron_ascend.config import ModelConfig, ParallelConfig, validate_all  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(prog="tools/reshard.py", description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--load-dir", required=True)
    p.add_argument("--save-dir", default=None)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-tensor-parallel-size", type=int, default=1)
    p.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    p.add_argument("--world-size", type=int, default=None, help="default: the smallest that fits the layout")
    p.add_argument("--save-dtype", default=None, choices=("fp32", "bf16", "fp16"))
    p.add_argument("--drop-optimizer", action="store_true")
    p.add_argument("--drop-rng", action="store_true")
    return p


def check(path: str, par: ParallelConfig):
    from megatron_ascend.checkpointing.hf import expected_tensors
    common = read_common(path)
    if not common.get("model_config"):
        raise CheckpointError(f"{path} records no model config; cannot check it against a layout")
    cfg = ModelConfig(**common["model_config"])
    validate_all(cfg, par)
    md = read_metadata(path)
    stored = md.state_dict_metadata
    problems = []
    for name, shape in expected_tensors(cfg).items():
        m = stored.get(name)
        if m is None:
            problems.append(f"{name} missing")
        elif tuple(m.size) != shape:
            problems.append(f"{name} stored {tuple(m.size)}, model {shape}")
        elif sum(math.prod(c.sizes) for c in m.chunks) != math.prod(shape):
            problems.append(f"{name} not fully covered")
    if problems:
        raise CheckpointError(f"{path} does not fit the model: {len(problems)} problem(s), e.g. {'; '.join(problems[:4])}")
    return common, cfg, md


@exit_on_config_error
def main(argv=None):
    a = build_parser().parse_args(argv)
    try:
        path, it = find_checkpoint(a.load_dir)
        if path is None:
            raise CheckpointError(f"{a.load_dir} holds no checkpoint")
        tp, pp, ep, etp = (a.tensor_model_parallel_size, a.pipeline_model_parallel_size,
                           a.expert_model_parallel_size, a.expert_tensor_parallel_size)
        world = a.world_size or tp * pp * (ep * etp // math.gcd(ep * etp, tp))
        par = ParallelConfig(world_size=world, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                             expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
                             num_layers_per_virtual_pipeline_stage=a.num_layers_per_virtual_pipeline_stage)
        common, cfg, md = check(path, par)
        print(f"{path}: fits tp {tp} pp {pp} ep {ep} etp {etp} (world {world}); load it there with --load")
        if not a.save_dir:
            return
        dtype = DTYPES.get(a.save_dtype)
        chunks = []
        for fqn, m in md.state_dict_metadata.items():
            if (a.drop_optimizer and fqn.startswith("optimizer/")) or (a.drop_rng and fqn.startswith("rng/")):
                continue
            is_weight = "/" not in fqn and not keep_fp32(fqn) and m.properties.dtype.is_floating_point
            out_dtype = dtype if (dtype is not None and is_weight) else m.properties.dtype

            def loader(fqn=fqn, m=m, out_dtype=out_dtype):
                t = torch.empty(tuple(m.size), dtype=m.properties.dtype)
                read_chunks(path, [Chunk(fqn, tuple(m.size), (0,) * len(m.size), t)], metadata=md)
                return t.to(out_dtype)
            chunks.append(Chunk(fqn, tuple(m.size), (0,) * len(m.size), loader=loader, shape=tuple(m.size),
                                dtype=out_dtype))
        tmp = prepare_tmp(a.save_dir, it)
        records = write_chunks(tmp, chunks, streaming=True)
        common = dict(common, resharded_for={"tp": tp, "pp": pp, "ep": ep, "etp": etp, "world_size": world})
        if a.drop_optimizer:
            common.update(has_optimizer=False, optimizer=None)
        if a.drop_rng:
            common["has_rng"] = False
        final = commit_checkpoint(a.save_dir, it, tmp, common, files=records)
        print(f"wrote {len(chunks)} tensors to {final}")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
