#!/usr/bin/env python
"""Plan a training job: which TP/PP/VP/EP/DP x distributed-optimizer x recompute layouts fit per-device memory,
and how fast each is predicted to run (tokens/s per device), ranked.

    python tools/plan.py --preset v3-2048-h800
    python tools/plan.py --preset v4pro-1024-910c
    python tools/plan.py --model-config config.json --device H800 --num-devices 256 --seq-length 4096 \
        --global-batch-size 1024 [--hbm-gib 80 --devices-per-node 8 --intra-node-gbps 160 --inter-node-gbps 50]
    python tools/plan.py --preset v3-2048-h800 --layout tp=1,pp=16,ep=64,distopt=1,rc=full,first=4,last=1

Everything is analytic (megatron_ascend/planner); see docs/PLANNER.md for the formulas and their checks.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ascend.arguments import exit_on_config_error  # noqa: E402
from megatron_ascend.config import ConfigError, ModelConfig  # noqa: E402
from megatron_ascend.planner.enumerate import MemoryOptions, evaluate, search  # noqa: E402
from megatron_ascend.planner.layout import Cluster, Layout  # noqa: E402
from megatron_ascend.planner.memory import Precision  # noqa: E402
from megatron_ascend.planner.presets import PRESETS, preset  # noqa: E402
from megatron_ascend.planner.report import assumptions, breakdown, format_report, plan_row  # noqa: E402
from megatron_ascend.planner.step_time import TimeOptions  # noqa: E402


def parse_layout(text: str, num_devices: int) -> Layout:
    kw = {}
    names = {"tp": "tp", "pp": "pp", "vp": "vp", "ep": "ep", "etp": "etp", "mbs": "micro_batch_size",
             "first": "first_stage_layers", "last": "last_stage_layers"}
    for part in text.split(","):
        if "=" not in part:
            raise ConfigError(f"--layout item {part!r} is not key=value; e.g. tp=1,pp=16,ep=64,distopt=1,rc=full")
        k, v = (x.strip() for x in part.split("=", 1))
        if k in names:
            kw[names[k]] = int(v)
        elif k == "distopt":
            kw["distributed_optimizer"] = v not in ("0", "false", "False")
        elif k == "sp":
            kw["sp"] = v not in ("0", "false", "False")
        elif k == "rc":
            kw["recompute"] = v
        elif k == "schedule":
            kw["schedule"] = v
        else:
            raise ConfigError(f"--layout key {k!r} is unknown; use tp pp vp ep etp mbs first last distopt sp rc schedule")
    tp, pp = kw.get("tp", 1), kw.get("pp", 1)
    if num_devices % (tp * pp):
        raise ConfigError(f"--layout tp {tp} x pp {pp} does not divide --num-devices {num_devices}")
    kw.setdefault("sp", tp > 1)
    return Layout(dp=num_devices // (tp * pp), **kw)


@exit_on_config_error
def main(argv=None):
    p = argparse.ArgumentParser(prog="tools/plan.py", description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--preset", choices=PRESETS)
    p.add_argument("--model-config", help="HuggingFace config.json of the model")
    p.add_argument("--device", help="device name from platform.peak_flops (H800, Ascend910C, ...)")
    p.add_argument("--tflops", type=float, help="dense bf16 peak TFLOP/s per device (overrides --device)")
    p.add_argument("--hbm-gib", type=float)
    p.add_argument("--devices-per-node", type=int)
    p.add_argument("--intra-node-gbps", type=float)
    p.add_argument("--inter-node-gbps", type=float)
    p.add_argument("--hbm-tbps", type=float)
    p.add_argument("--num-devices", type=int)
    p.add_argument("--seq-length", type=int)
    p.add_argument("--global-batch-size", type=int)
    p.add_argument("--precision", choices=("bf16", "bf16-bf16moments", "fp32"))
    p.add_argument("--efficiency", type=float, help="achieved fraction of peak in compute kernels (default 0.5)")
    p.add_argument("--overlap-ep", type=float, help="fraction of the expert all-to-all hidden behind compute")
    p.add_argument("--reserve-gib", type=float, default=4.0)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--layout", help="evaluate one layout, e.g. tp=1,pp=16,ep=64,distopt=1,rc=full,first=4,last=1")
    p.add_argument("--recompute", nargs="*", default=["none", "selective", "full"])
    run(p.parse_args(argv))


def run(args):
    ps = preset(args.preset) if args.preset else None
    if ps is None and not args.model_config:
        raise ConfigError("pass --preset NAME or --model-config config.json (with --device or --tflops, "
                          "--num-devices, --seq-length, --global-batch-size)")
    cfg = ModelConfig.from_json_file(args.model_config) if args.model_config else ps.model
    if ps is not None and not any(getattr(args, k) is not None for k in (
            "device", "tflops", "hbm_gib", "devices_per_node", "intra_node_gbps", "inter_node_gbps", "num_devices")):
        cluster = ps.cluster
    else:
        base = ps.cluster if ps else Cluster(num_devices=0)
        if args.device or args.tflops:
            cluster = Cluster.from_device(args.device or "custom", args.num_devices or base.num_devices,
                                          tflops=args.tflops)
        else:
            cluster = base
        cluster = Cluster(num_devices=args.num_devices or cluster.num_devices,
                          devices_per_node=args.devices_per_node or base.devices_per_node,
                          tflops=cluster.tflops, hbm_gib=args.hbm_gib or base.hbm_gib,
                          intra_node_gbps=args.intra_node_gbps or base.intra_node_gbps,
                          inter_node_gbps=args.inter_node_gbps or base.inter_node_gbps,
                          hbm_tbps=args.hbm_tbps or base.hbm_tbps, name=args.device or base.name)
    if cluster.num_devices <= 0:
        raise ConfigError("--num-devices is missing; pass the number of devices of the job")
    seq = args.seq_length or (ps.seq_length if ps else None)
    gbs = args.global_batch_size or (ps.global_batch_size if ps else None)
    if not seq or not gbs:
        raise ConfigError("--seq-length and --global-batch-size are required without a preset")
    prec = Precision.named(args.precision or (ps.precision if ps else "bf16"))
    topts = ps.time if ps else TimeOptions()
    if args.efficiency is not None:
        topts = TimeOptions(**{**topts.__dict__, "efficiency": args.efficiency})
    if args.overlap_ep is not None:
        topts = TimeOptions(**{**topts.__dict__, "overlap_ep": args.overlap_ep})
    mopts = MemoryOptions(reserve_gib=args.reserve_gib)
    lines = assumptions(cfg, cluster, seq, gbs, prec, topts, mopts)
    if args.layout:
        lay = parse_layout(args.layout, cluster.num_devices)
        plan = evaluate(cfg, lay, cluster, seq, gbs, prec, topts, mopts)
        print("\n".join(["assumptions:"] + ["  " + a for a in lines]))
        print(plan_row(plan))
        print("fits" if plan.feasible else "does NOT fit")
        print("\n".join(breakdown(plan)))
        return
    plans, n, bad = search(cfg, cluster, seq, gbs, prec, topts, mopts, recompute=tuple(args.recompute))
    refs = {}
    if ps:
        for name, lay in ps.reference_layouts.items():
            t = ps.dualpipe_time if lay.schedule == "dualpipe" else topts
            t = TimeOptions(**{**t.__dict__, "efficiency": topts.efficiency})
            refs[name] = evaluate(cfg, lay, cluster, seq, gbs, prec, t, mopts)
    title = ps.question if ps else f"{cfg.model_type} on {cluster.num_devices} x {cluster.name}"
    print(format_report(title, lines, plans, n, bad, args.top, refs, ps.reference_tokens_per_s if ps else None))


if __name__ == "__main__":
    main()
