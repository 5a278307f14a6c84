#!/usr/bin/env python
"""Convert DeepSeek checkpoints between HuggingFace safetensors and megatron_ascend's sharded format.

    # HF (V2 / V2-Lite / V3 / V3.2 / V4; bf16, FP8 block-quantised, V4's FP4 experts; V4 in transformers' or
    # DeepSeek's original naming, detected from the tensor names) -> ours, checked for a TP/PP/EP layout
    python tools/convert_ckpt.py --direction hf2ma --load-dir DeepSeek-V3 --save-dir ckpt/v3 \
        --tensor-model-parallel-size 4 --pipeline-model-parallel-size 8 --expert-model-parallel-size 32 \
        [--num-layers-per-virtual-pipeline-stage V] [--save-dtype bf16|fp32] [--workers 8]
    # ours (a --save directory or one iter_XXXXXXX directory) -> HF directory transformers can load
    python tools/convert_ckpt.py --direction ma2hf --load-dir ckpt/run --save-dir hf_out [--save-dtype bf16] \
        [--save-naming hf|original]
    # HF -> HF without our model: dequantise (FP8 / FP4 -> bf16) and rename, e.g. DeepSeek's V4 release to a
    # bf16 directory transformers loads anywhere (--save-naming: hf = transformers' names, original = DeepSeek's)
    python tools/convert_ckpt.py --direction hf2hf --load-dir DeepSeek-V4-Flash --save-dir v4-bf16 \
        [--save-naming hf|original] [--save-dtype bf16|fp32] [--max-shard-size 5GB]

Our checkpoint stores global tensors, so the T/P/E given to hf2ma are validated (heads, experts and layers must
divide) and recorded in common.json; the result loads with --load / --finetune at that or any other layout.
Thin CLI over megatron_ascend/checkpointing/hf.py. Prints the peak memory and the largest tensor / shard.

MindSpeed-LLM's command lines work too (docs/MIGRATING.md): --load-model-type hf --save-model-type mg is
hf2ma, mg -> hf is ma2hf (without either, and without --direction, the direction follows what --load-dir
holds); --target-{tensor,pipeline,expert}-parallel-size are the layout to check; --model-type-hf, --num-layers
(which counts --noop-layers), --mtp-num-layers and --first-k-dense-replace are checked against the checkpoint's
config.json; --hf-cfg-dir is the config for ma2hf; layout-only flags are accepted without effect.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ascend import arguments_compat as compat  # noqa: E402
from megatron_ascend.arguments import exit_on_config_error  # noqa: E402
from megatron_ascend.checkpointing import CheckpointError  # noqa: E402
from megatron_ascend.config import ConfigError  # noqa: E402

GB = 2 ** 30


def _parse_bytes(s: str) -> int:
    units = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}
    u = s.upper()
    for k in sorted(units, key=len, reverse=True):
        if u.endswith(k):
            return int(float(u[: -len(k)]) * units[k])
    return int(s)


def build_parser():
    p = argparse.ArgumentParser(prog="tools/convert_ckpt.py", description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--direction", choices=("hf2ma", "ma2hf", "hf2hf"), default=None,
                   help="default: from --load-model-type / --save-model-type, else from what --load-dir holds "
                        "(hf2hf is only ever chosen by name)")
    p.add_argument("--load-dir", required=True)
    p.add_argument("--save-dir", required=True)
    p.add_argument("--tensor-model-parallel-size", "--target-tensor-parallel-size", dest="tensor_model_parallel_size",
                   type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", "--target-pipeline-parallel-size",
                   dest="pipeline_model_parallel_size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", "--target-expert-parallel-size",
                   dest="expert_model_parallel_size", type=int, default=1)
    p.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    p.add_argument("--save-dtype", default=None, choices=("fp32", "bf16", "fp16"),
                   help="dtype written (default: the source dtype; FP8 / FP4 sources become bf16; integer "
                        "tensors, the router bias and V4's fp32 parameters keep their dtype)")
    p.add_argument("--save-naming", default=None, choices=("hf", "original"),
                   help="ma2hf / hf2hf, DeepSeek-V4 only: tensor names written: hf (default; the names "
                        "transformers' save_pretrained writes) or original (DeepSeek's release names)")
    p.add_argument("--workers", type=int, default=1, help="hf2ma: processes reading HF files in parallel")
    p.add_argument("--max-shard-size", default="5GB", help="ma2hf / hf2hf: size of each output safetensors file")
    p.add_argument("--model-config", default=None, help="ma2hf: config.json when the checkpoint records none")
    p.add_argument("--mtp-copy-mismatch", default="error", choices=("error", "keep-main"),
                   help="hf2ma: when an MTP layer's embed_tokens / shared_head.head differ from the main embedding / "
                        "head (our model shares them), refuse (error) or keep the main ones with a warning")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("MindSpeed-LLM names (docs/MIGRATING.md)")
    g.add_argument("--load-model-type", choices=("hf", "mg"), default=None, help="hf: --direction hf2ma; mg: ma2hf")
    g.add_argument("--save-model-type", choices=("hf", "mg"), default=None)
    g.add_argument("--model-type-hf", default=None, help="checked against the checkpoint's model_type")
    g.add_argument("--num-layers", type=int, default=None,
                   help="checked: the checkpoint's layers plus the --noop-layers count")
    g.add_argument("--noop-layers", default=None, help="accepted: layer placement is chosen at training time")
    g.add_argument("--mtp-num-layers", type=int, default=None, help="checked against the checkpoint's MTP layers")
    g.add_argument("--first-k-dense-replace", type=int, default=None, help="checked against the checkpoint")
    g.add_argument("--hf-cfg-dir", default=None, help="ma2hf: the directory of the HF config.json")
    g.add_argument("--num-layer-list", default=None, help="accepted: layer placement is chosen at training time")
    compat.add_tool_flags(p, compat.CONVERT_FLAGS)
    return p


def _direction(args) -> str:
    types = (args.load_model_type, args.save_model_type)
    by_types = {("hf", "mg"): "hf2ma", ("mg", "hf"): "ma2hf", ("hf", None): "hf2ma", ("mg", None): "ma2hf",
                (None, "mg"): "hf2ma", (None, "hf"): "ma2hf"}
    if types in (("hf", "hf"), ("mg", "mg")):
        raise ConfigError(f"--load-model-type {types[0]} --save-model-type {types[1]}: nothing to convert; "
                          f"use hf -> mg or mg -> hf (to change a layout, our checkpoints need no conversion)")
    d = by_types.get(types)
    if args.direction and d and args.direction != d:
        raise ConfigError(f"--direction {args.direction} contradicts --load-model-type / --save-model-type "
                          f"({d}); give one")
    if args.direction or d:
        return args.direction or d
    if os.path.isfile(os.path.join(args.load_dir, "config.json")) and any(
            f.endswith(".safetensors") for f in os.listdir(args.load_dir)):
        return "hf2ma"
    return "ma2hf"


def _check_hf_config(args, placement: bool) -> None:
    """MindSpeed's architecture flags must agree with the HF checkpoint being converted."""
    import json
    path = os.path.join(args.load_dir, "config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        cfg = json.load(f)
    noop = len([x for x in str(args.noop_layers or "").replace(" ", "").split(",") if x])
    checks = []
    if args.model_type_hf is not None:
        want = compat.MODEL_TYPE_HF.get(args.model_type_hf)
        if want is None:
            raise ConfigError(f"--model-type-hf {args.model_type_hf!r} is not a DeepSeek model we convert; use one "
                              f"of {', '.join(compat.MODEL_TYPE_HF)}")
        checks.append(("--model-type-hf", args.model_type_hf, cfg.get("model_type"), want))
    if args.num_layers is not None:
        checks.append(("--num-layers", args.num_layers, cfg.get("num_hidden_layers"), args.num_layers - noop))
    if args.mtp_num_layers is not None:
        checks.append(("--mtp-num-layers", args.mtp_num_layers, cfg.get("num_nextn_predict_layers", 0),
                       args.mtp_num_layers))
    if args.first_k_dense_replace is not None:
        checks.append(("--first-k-dense-replace", args.first_k_dense_replace, cfg.get("first_k_dense_replace", 0),
                       args.first_k_dense_replace))
    for flag, given, have, want in checks:
        if have != want:
            raise ConfigError(f"{flag} {given} disagrees with {path} ({have}"
                              + (f" layers + {noop} --noop-layers" if flag == "--num-layers" else "")
                              + "); fix the flag or --load-dir")


@exit_on_config_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    for line in compat.resolve_tool(args, compat.CONVERT_FLAGS):
        print(line)
    args.direction = _direction(args)
    from megatron_ascend.checkpointing import hf
    if args.direction == "hf2ma" and args.save_naming is not None:
        raise ConfigError("--save-naming applies to ma2hf and hf2hf (the HF names written); hf2ma reads either "
                          "naming by itself: drop the flag")
    if args.direction == "hf2hf":  # no model, no layout: these flags would do nothing
        unused = [f for f, v in (("--tensor-model-parallel-size", args.tensor_model_parallel_size != 1),
                                 ("--pipeline-model-parallel-size", args.pipeline_model_parallel_size != 1),
                                 ("--expert-model-parallel-size", args.expert_model_parallel_size != 1),
                                 ("--num-layers-per-virtual-pipeline-stage",
                                  args.num_layers_per_virtual_pipeline_stage is not None),
                                 ("--workers", args.workers != 1), ("--model-config", args.model_config is not None),
                                 ("--hf-cfg-dir", args.hf_cfg_dir is not None)) if v]
        if unused:
            raise ConfigError(f"{', '.join(unused)}: not used by --direction hf2hf (it rewrites a HF directory "
                              f"without our model or a layout); drop them")
    try:
        if args.direction == "hf2hf":
            from megatron_ascend.checkpointing.hf_rewrite import convert_hf_to_hf
            rep = convert_hf_to_hf(args.load_dir, args.save_dir, args.save_naming or "hf", args.save_dtype,
                                   _parse_bytes(args.max_shard_size), progress=not args.no_progress)
            for n in rep["notes"]:
                print(f"note: {n}")
            print(f"wrote {rep['tensors']} tensors in {rep['shards']} shard(s) ({rep['bytes'] / GB:.3f} GiB) to "
                  f"{rep['path']} in the {args.save_naming or 'hf'!r} naming")
            print(f"largest shard {rep['largest_shard_bytes'] / GB:.4f} GiB, peak RSS {rep['peak_rss_bytes'] / GB:.3f} GiB")
        elif args.direction == "hf2ma":
            placement = args.noop_layers is not None or args.num_layer_list is not None
            _check_hf_config(args, placement)
            pp, vp = args.pipeline_model_parallel_size, args.num_layers_per_virtual_pipeline_stage
            if placement:  # MindSpeed's noop layers / layer lists: placement is checked when training starts
                print(f"note: --noop-layers / --num-layer-list: the layer split over pipeline-model-parallel-size "
                      f"{pp} is checked at training time, not here")
                pp, vp = 1, None
            rep = hf.convert_hf_to_ma(args.load_dir, args.save_dir, args.tensor_model_parallel_size,
                                      pp, args.expert_model_parallel_size, vp, args.save_dtype, args.workers,
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
            if args.hf_cfg_dir and not args.model_config:
                args.model_config = os.path.join(args.hf_cfg_dir, "config.json")
            if args.model_config:
                from megatron_ascend.config import ModelConfig
                cfg = ModelConfig.from_json_file(args.model_config)
            rep = hf.convert_ma_to_hf(args.load_dir, args.save_dir, args.save_dtype,
                                      _parse_bytes(args.max_shard_size), progress=not args.no_progress,
                                      model_config=cfg, naming=args.save_naming or "hf")
            print(f"wrote {rep['tensors']} tensors in {rep['shards']} shard(s) ({rep['bytes'] / GB:.3f} GiB) to "
                  f"{args.save_dir}")
            print(f"largest shard {rep['largest_shard_bytes'] / GB:.4f} GiB, peak RSS {rep['peak_rss_bytes'] / GB:.3f} GiB")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from megatron_ascend.checkpointing.hf_dir import fix_malloc_threshold
    fix_malloc_threshold()  # this process only converts: bounded memory (see hf_dir.fix_malloc_threshold)
    main()
