#!/usr/bin/env python
"""Convert DeepSeek checkpoints between HuggingFace safetensors and megatron_ascend's sharded format.

    # HF (V2 / V2-Lite / V3 / V3.2, bf16 or FP8 block-quantised) -> ours, checked for a TP/PP/EP layout
    python tools/convert_ckpt.py --direction hf2ma --load-dir DeepSeek-V3 --save-dir ckpt/v3 \
        --tensor-model-parallel-size 4 --pipeline-model-parallel-size 8 --expert-model-parallel-size 32 \
        [--num-layers-per-virtual-pipeline-stage V] [--save-dtype bf16|fp32] [--workers 8]
    # ours (a --save directory or one iter_XXXXXXX directory) -> HF directory transformers can load
    python tools/convert_ckpt.py --direction ma2hf --load-dir ckpt/run --save-dir hf_out [--save-dtype bf16]

Our checkpoint stores global tensors, so the T/P/E given to hf2ma are validated (heads, experts and layers must
divide) and recorded in common.json; the result loads with --load / --finetune at that or any other layout.
Thin CLI over megatron_ascend/checkpointing/hf.py. Prints the peak memory and the largest tensor / shard.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ascend.arguments import exit_on_config_error  # noqa: E402
from megatron_ascend.checkpointing import CheckpointError  # noqa: E402

GB = 2 ** 30


def _parse_bytes(s: str) -> int:
    units = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}
    u = s.upper()
    for k in sorted(units, key=len, reverse=True):
        if u.endswith(k):
            return int(float(u[: -len(k)]) * units[k])
    return int(s)


def build_parser():
    p = argparse.ArgumentParser(prog="tools/convert_ckpt.py", description=__doc__.split("\n")[0])
    p.add_argument("--direction", choices=("hf2ma", "ma2hf"), required=True)
    p.add_argument("--load-dir", required=True)
    p.add_argument("--save-dir", required=True)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    p.add_argument("--save-dtype", default=None, choices=("fp32", "bf16", "fp16"),
                   help="dtype written (default: the source dtype; FP8 sources become bf16)")
    p.add_argument("--workers", type=int, default=1, help="hf2ma: processes reading HF files in parallel")
    p.add_argument("--max-shard-size", default="5GB", help="ma2hf: size of each output safetensors file")
    p.add_argument("--model-config", default=None, help="ma2hf: config.json when the checkpoint records none")
    p.add_argument("--mtp-copy-mismatch", default="error", choices=("error", "keep-main"),
                   help="hf2ma: when an MTP layer's embed_tokens / shared_head.head differ from the main embedding / "
                        "head (our model shares them), refuse (error) or keep the main ones with a warning")
    p.add_argument("--no-progress", action="store_true")
    return p


@exit_on_config_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    from megatron_ascend.checkpointing import hf
    try:
        if args.direction == "hf2ma":
            rep = hf.convert_hf_to_ma(args.load_dir, args.save_dir, args.tensor_model_parallel_size,
                                      args.pipeline_model_parallel_size, args.expert_model_parallel_size,
                                      args.num_layers_per_virtual_pipeline_stage, args.save_dtype, args.workers,
                                      progress=not args.no_progress, mtp_copies=args.mtp_copy_mismatch)
            for n in rep["notes"]:
                print(f"{'warning' if 'MTP copy' in n else 'note'}: {n}")
            print(f"wrote {rep['tensors']} tensors ({rep['bytes'] / GB:.3f} GiB) to {rep['path']}")
            print(f"largest tensor {rep['largest_tensor_bytes'] / GB:.4f} GiB, largest HF file "
                  f"{rep['largest_file_bytes'] / GB:.4f} GiB, peak RSS {rep['peak_rss_bytes'] / GB:.3f} GiB"
                  + (f" (workers {rep['peak_rss_children_bytes'] / GB:.3f} GiB each at most)" if args.workers > 1
                     else ""))
        else:
            cfg = None
            if args.model_config:
                from megatron_ascend.config import ModelConfig
                cfg = ModelConfig.from_json_file(args.model_config)
            rep = hf.convert_ma_to_hf(args.load_dir, args.save_dir, args.save_dtype,
                                      _parse_bytes(args.max_shard_size), progress=not args.no_progress,
                                      model_config=cfg)
            print(f"wrote {rep['tensors']} tensors in {rep['shards']} shard(s) ({rep['bytes'] / GB:.3f} GiB) to "
                  f"{args.save_dir}")
            print(f"largest shard {rep['largest_shard_bytes'] / GB:.4f} GiB, peak RSS {rep['peak_rss_bytes'] / GB:.3f} GiB")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
