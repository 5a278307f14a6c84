#!/usr/bin/env python
"""Plan a training job: which TP/PP/VP/EP/DP x distributed-optimizer x recompute layouts fit per-device memory,
and how fast each is predicted to run (tokens/s per device), ranked.

    python tools/plan.py --preset v3-2048-h800
    python tools/plan.py --preset v4pro-1024-910c
    python tools/plan.py --model-config config.json --device Ascend910C --num-devices 512 --seq-length 4096
        --global-batch-size 3840 [--hbm-gib 64 --devices-per-node 16 --intra-node-gbps 196 --inter-node-gbps 25]
    python tools/plan.py --preset v3-2048-h800 --layout tp=1,pp=16,ep=64,distopt=1,rc=full,first=4,last=1
    python tools/plan.py --validate        # the planner against published DeepSeek-V3 runs (docs/PLANNER.md)
    python tools/plan.py --list-devices    # the device table with every figure's source and grade

--device fills every figure of the cluster from megatron_ascend/platform/devices.py; each figure flag replaces
one. Exit status: 0 a plan fits, 1 no layout fits (one line on stderr says by how much), 2 bad input.
Everything is analytic (megatron_ascend/planner); see docs/PLANNER.md for the formulas and their checks.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ascend.arguments import exit_on_config_error  # noqa: E402
from megatron_ascend.config import ConfigError, ModelConfig  # noqa: E402
from megatron_ascend.planner.enumerate import MemoryOptions, evaluate, search  # noqa: E402
from megatron_ascend.planner.layout import Cluster, Layout, parse_layer_counts  # noqa: E402
from megatron_ascend.planner.memory import Precision  # noqa: E402
from megatron_ascend.planner.presets import PRESETS, preset  # noqa: E402
from megatron_ascend.planner.report import assumptions, breakdown, format_report, no_fit_line, plan_row  # noqa: E402
from megatron_ascend.planner.step_time import TimeOptions  # noqa: E402
from megatron_ascend.planner.validation import format_validation, validate  # noqa: E402
from megatron_ascend.platform.devices import DEVICES, known_devices  # noqa: E402


FIGURE_FLAGS = {"tflops": "--tflops", "hbm_gib": "--hbm-gib", "hbm_tbps": "--hbm-tbps",
                "devices_per_node": "--devices-per-node", "intra_node_gbps": "--intra-node-gbps",
                "inter_node_gbps": "--inter-node-gbps"}


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
        elif k == "layers":
            kw["layer_counts"] = parse_layer_counts(v)
        else:
            raise ConfigError(f"--layout key {k!r} is unknown; use tp pp vp ep etp mbs first last distopt sp rc "
                              f"schedule layers")
    tp, pp = kw.get("tp", 1), kw.get("pp", 1)
    if num_devices % (tp * pp):
        raise ConfigError(f"--layout tp {tp} x pp {pp} does not divide --num-devices {num_devices}")
    kw.setdefault("sp", tp > 1)
    try:
        return Layout(dp=num_devices // (tp * pp), **kw)
    except ValueError as e:
        raise ConfigError(f"--layout {text}: {e}") from None


def build_cluster(args, ps) -> Cluster:
    """--device fills every figure from the device table, else the preset's cluster, else all six figure flags;
    each figure flag given replaces one figure."""
    given = {k: getattr(args, k) for k in FIGURE_FLAGS if getattr(args, k) is not None}
    num = args.num_devices if args.num_devices is not None else (ps.cluster.num_devices if ps else 0)
    if args.device:
        return Cluster.from_device(args.device, num, **given)
    if ps is not None:
        return ps.cluster.replace(num_devices=num, **given)
    missing = [f for k, f in FIGURE_FLAGS.items() if k not in given]
    if missing:
        raise ConfigError(f"pass --device NAME (one of {', '.join(known_devices())}) or every device figure; "
                          f"missing {' '.join(missing)}")
    return Cluster(num_devices=num, name="custom", overrides=tuple(sorted(given)), **given)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/plan.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--preset", choices=PRESETS)
    p.add_argument("--model-config", help="HuggingFace config.json of the model")
    p.add_argument("--device", help="device from the device table (platform/devices.py): fills every figure; "
                                    f"one of {', '.join(known_devices())}")
    p.add_argument("--tflops", type=float, help="dense bf16 peak TFLOP/s per device (replaces the table's)")
    p.add_argument("--hbm-gib", type=float, help="HBM per device, GiB")
    p.add_argument("--hbm-tbps", type=float, help="HBM bandwidth per device, TB/s (times the optimizer step)")
    p.add_argument("--devices-per-node", type=int, help="devices in one fast-interconnect domain")
    p.add_argument("--intra-node-gbps", type=float, help="GB/s per device, one direction, inside a node")
    p.add_argument("--inter-node-gbps", type=float, help="GB/s per device, one direction, between nodes")
    p.add_argument("--num-devices", type=int)
    p.add_argument("--seq-length", type=int)
    p.add_argument("--global-batch-size", type=int)
    p.add_argument("--precision", choices=("bf16", "bf16-bf16moments", "fp32"))
    p.add_argument("--efficiency", type=float, help="achieved fraction of peak in compute kernels (default 0.5)")
    p.add_argument("--overlap-ep", type=float, help="fraction of the expert all-to-all hidden behind compute")
    p.add_argument("--reserve-gib", type=float, help="GiB per device kept for the runtime and buffers (default 4)")
    p.add_argument("--top", type=int, help="how many ranked layouts to print (default 15)")
    p.add_argument("--layout", help="evaluate one layout, e.g. tp=1,pp=16,ep=64,distopt=1,rc=full,first=4,last=1 "
                                    "(schedule=dualpipe|dualpipev, layers=1:2*30:0 for per-stage layer counts)")
    p.add_argument("--recompute", nargs="*", help="recompute modes to search (default: none selective full)")
    p.add_argument("--validate", action="store_true",
                   help="print the planner's predictions for published DeepSeek-V3 runs and the ratios")
    p.add_argument("--list-devices", action="store_true", help="print the device table with sources and grades")
    return p


@exit_on_config_error
def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


def list_devices() -> str:
    out = ["| device | TFLOP/s bf16 | HBM GiB | HBM TB/s | devices/node | intra GB/s | inter GB/s |",
           "|---|---|---|---|---|---|---|"]
    for d in DEVICES.values():
        cells = [f"{f.value:g} [{f.grade}]" for f in d.figures().values()]
        out.append(f"| {d.name} | " + " | ".join(cells) + " |")
    out += ["", "Sources (grade: H stated by the vendor / primary reference, M derived from one, L third-party):"]
    for d in DEVICES.values():
        out.append(f"* **{d.name}** ({d.description}" + (f"; also {', '.join(d.aliases)}" if d.aliases else "") + ")")
        for k, f in d.figures().items():
            out.append(f"  * {k} {f.value:g} [{f.grade}]: {f.source}")
    return "\n".join(out)


PLANNING_FLAGS = ("preset", "model_config", "device", *FIGURE_FLAGS, "num_devices", "seq_length", "global_batch_size",
                  "precision", "overlap_ep", "layout", "reserve_gib", "top", "recompute")


def run(args) -> int:
    if args.list_devices or args.validate:
        mode = "--list-devices" if args.list_devices else "--validate"
        unused = ["--" + k.replace("_", "-") for k in PLANNING_FLAGS + (("efficiency",) if args.list_devices else ())
                  if getattr(args, k) is not None] + (["--validate"] if args.list_devices and args.validate else [])
        if unused:
            raise ConfigError(f"{mode} takes no planning flags (it would ignore {', '.join(unused)}); "
                              f"{'only --efficiency changes --validate' if mode == '--validate' else 'drop them'}")
    if args.list_devices:
        print(list_devices())
        return 0
    if args.validate:
        print(format_validation(validate(efficiency=args.efficiency)))
        return 0
    ps = preset(args.preset) if args.preset else None
    if ps is None and not args.model_config:
        raise ConfigError("pass --preset NAME or --model-config config.json (with --device, --num-devices, "
                          "--seq-length, --global-batch-size)")
    cfg = ModelConfig.from_json_file(args.model_config) if args.model_config else ps.model
    cluster = build_cluster(args, ps)
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
    mopts = MemoryOptions(reserve_gib=4.0 if args.reserve_gib is None else args.reserve_gib)
    lines = assumptions(cfg, cluster, seq, gbs, prec, topts, mopts)
    if args.layout:
        lay = parse_layout(args.layout, cluster.num_devices)
        try:
            plan = evaluate(cfg, lay, cluster, seq, gbs, prec, topts, mopts)
        except ValueError as e:
            raise ConfigError(f"--layout {args.layout}: {e}") from None
        print("\n".join(["assumptions:"] + ["  " + a for a in lines]))
        print(plan_row(plan))
        print("fits" if plan.feasible else "does NOT fit")
        print("\n".join(breakdown(plan)))
        if not plan.feasible:
            print("error: " + no_fit_line([plan], cluster, mopts), file=sys.stderr)
            return 1
        return 0
    rc_modes = tuple(args.recompute or ("none", "selective", "full"))
    everything, n, bad = search(cfg, cluster, seq, gbs, prec, topts, mopts, recompute=rc_modes, keep_infeasible=True)
    plans = [q for q in everything if q.feasible]
    refs, skipped = {}, 0
    if ps:
        for name, lay in ps.reference_layouts.items():
            if lay.world != cluster.num_devices:
                skipped += 1  # the preset's layouts are for its own device count
                continue
            t = ps.dualpipe_time if lay.schedule == "dualpipe" else topts
            t = TimeOptions(**{**t.__dict__, "efficiency": topts.efficiency})
            refs[name] = evaluate(cfg, lay, cluster, seq, gbs, prec, t, mopts)
    title = ps.question if ps else f"{cfg.model_type} on {cluster.num_devices} x {cluster.name}"
    top = 15 if args.top is None else args.top
    print(format_report(title, lines, plans, n, bad, top, refs, ps.reference_tokens_per_s if ps else None))
    if skipped:
        print(f"({skipped} reference layouts of the preset skipped: they are for {ps.cluster.num_devices} devices)")
    if not plans:
        print("error: " + (no_fit_line(everything, cluster, mopts) if everything else
                           f"all {n} layouts break a config rule (see the assumptions above)"), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
