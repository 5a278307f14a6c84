#!/usr/bin/env python
"""Where a training step's time goes, by component: self CPU time of every op from torch.profiler, attributed
to the model component whose forward ran it -- backward ops through the autograd node's sequence number back to
the forward op that recorded it -- plus the optimizer step (grad norm, fused AdamW) and the grad-buffer work.

    python bench/breakdown.py [--config mfu|small] [--threads 2]

Components: embedding; attention projections (the MLA linears) and attention core (RoPE, concat, the causal
block softmax(QK^T)V, everything else in MLAttention); norms; dense MLP; MoE router (gate + top-k + aux loss),
routed experts (grouped GEMMs + SwiGLU), shared experts, MoE permutation / all-to-all / combine (the rest of
MoELayer); head + cross-entropy (output layer, loss); optimizer. GEMM time is printed separately inside each.
One profiled step after warm-up; the profiler's own overhead inflates small ops. Not a test.
"""
import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

GEMM_OPS = {"aten::mm", "aten::bmm", "aten::baddbmm", "aten::addmm", "aten::addmm_", "aten::baddbmm_",
            "aten::_grouped_mm"}


def _label(name, mod):
    cls = type(mod).__name__
    if cls in ("Linear", "ColumnParallelLinear", "RowParallelLinear") and ".self_attn." in f".{name}.":
        return "attention projections"
    if name == "lm_head":
        return "head + cross-entropy"
    return {"VocabParallelEmbedding": "embedding", "MLAttention": "attention core", "RMSNorm": "norms",
            "DenseMLP": "dense MLP", "TopKRouter": "MoE router", "GroupedExperts": "MoE routed experts",
            "SharedExperts": "MoE shared experts", "MoELayer": "MoE permutation / combine",
            "DeepseekForCausalLM": "head + cross-entropy"}.get(cls)


def _install_scopes(model):
    """Forward pre/post hooks that open / close a profiler range named by the component."""
    handles = []
    for name, mod in model.named_modules():
        label = _label(name, mod)
        if label is None:
            continue
        stack = []

        def pre(m, args, label=label, stack=stack):
            rf = torch.profiler.record_function("component::" + label)
            rf.__enter__()
            stack.append(rf)

        def post(m, args, out, stack=stack):
            stack.pop().__exit__(None, None, None)

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    return handles


def _scope_of(ev):
    while ev is not None:
        if ev.name.startswith("component::"):
            return ev.name[len("component::"):]
        ev = ev.cpu_parent
    return None


def attribute(events, phase_of_range):
    """{(component, phase): [self_us, gemm_us]}; phase 'forward', 'backward' or a named range."""
    # sequence number -> component of the forward op that created the autograd node. An op records the number
    # the *next* node will get, so ops that create none (no-op casts, a custom Function's inner ops) share it
    # with the op that does -- the last of them in time (for a custom Function: its inner ops).
    fwd_scope = {}
    for ev in sorted(events, key=lambda e: e.time_range.start):
        if ev.sequence_nr >= 0 and not ev.name.startswith("autograd::"):
            s = _scope_of(ev)
            if s is not None:
                fwd_scope[ev.sequence_nr] = s
    out = collections.defaultdict(lambda: [0.0, 0.0])
    for ev in events:
        if ev.name.startswith(("component::", "phase::")) or ev.self_cpu_time_total <= 0:
            continue
        comp, phase, p = None, "other", ev
        node = None
        while p is not None:
            if p.name.startswith("autograd::engine::evaluate_function") and node is None:
                node = p
            if p.name.startswith("phase::"):
                phase = p.name[len("phase::"):]
                break
            p = p.cpu_parent
        if node is not None:
            comp = fwd_scope.get(node.sequence_nr)
            if comp is None:  # e.g. AccumulateGrad / the DDP hook: grad-buffer work
                comp = "grad accumulation (hooks)" if "AccumulateGrad" in node.name else "backward, unattributed"
            phase = "backward"
        else:
            comp = _scope_of(ev) or phase_of_range.get(phase, "unattributed")
        cell = out[(comp, phase)]
        cell[0] += ev.self_cpu_time_total
        if ev.name in GEMM_OPS:
            cell[1] += ev.self_cpu_time_total
        OPS[(comp, phase, ev.name)] += ev.self_cpu_time_total
    return out


OPS = collections.Counter()  # (component, phase, op name) -> self us, for --ops


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--config", default="mfu", choices=("mfu", "small"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ops", default=None, metavar="COMPONENT", help="also list the top ops of this component")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from megatron_ascend.config import ModelConfig, OptimizerConfig
    from megatron_ascend.distributed import DistributedDataParallel
    from megatron_ascend.models.deepseek import DeepseekForCausalLM
    from megatron_ascend.optimizer import build_optimizer
    from megatron_ascend.platform import tune_host_allocator
    tune_host_allocator()
    if a.config == "mfu":
        import mfu
        cfg, seq, mbs = ModelConfig(**mfu.CFG), mfu.SEQ, mfu.MBS
    else:
        import vs_transformers as vt
        from megatron_ascend.models.deepseek.hf import model_config_for_hf
        from transformers import DeepseekV3Config
        spec = vt.CONFIGS["small"]
        cfg = model_config_for_hf(DeepseekV3Config(**spec["model"], num_nextn_predict_layers=0),
                                  aux_loss_alpha=0.0, num_nextn_predict_layers=0)
        seq, mbs = spec["seq"], spec["mbs"]
    torch.manual_seed(0)
    m = DeepseekForCausalLM(cfg)
    ddp = DistributedDataParallel(m)
    opt = build_optimizer(ddp, OptimizerConfig(lr=1e-4, weight_decay=0.01, clip_grad=1.0), None)
    ids = torch.randint(0, cfg.vocab_size, (mbs, seq))
    mask = torch.ones(mbs, seq)
    rf = torch.profiler.record_function

    def step():
        with rf("phase::zero_grad"):
            opt.zero_grad()
        with rf("phase::forward"):
            out = m(ids, labels=ids, loss_mask=mask)
            loss = (out["lm_loss"] * mask).sum() / mask.sum()
        loss.backward()
        with rf("phase::optimizer"):
            opt.step()

    for _ in range(3):
        step()
    handles = _install_scopes(m)
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    for h in handles:
        h.remove()
    cells = attribute(prof.events(), {"optimizer": "optimizer (grad norm + AdamW)", "zero_grad": "zero grad buffer",
                                      "forward": "head + cross-entropy"})
    comps = collections.defaultdict(lambda: {"forward": 0.0, "backward": 0.0, "other": 0.0, "gemm": 0.0})
    for (comp, phase), (us, gemm) in cells.items():
        key = phase if phase in ("forward", "backward") else "other"
        comps[comp][key] += us / 1e3
        comps[comp]["gemm"] += gemm / 1e3
    total = sum(c["forward"] + c["backward"] + c["other"] for c in comps.values())
    print(f"config {a.config}: h {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts "
          f"top-{cfg.num_experts_per_tok}, seq {seq} x mbs {mbs}; profiled self CPU time {total:.1f} ms")
    print(f"{'component':34s} {'fwd ms':>8s} {'bwd ms':>8s} {'other':>8s} {'total':>8s} {'share':>6s} "
          f"{'of it GEMM':>10s}")
    for comp, c in sorted(comps.items(), key=lambda kv: -(kv[1]['forward'] + kv[1]['backward'] + kv[1]['other'])):
        t = c["forward"] + c["backward"] + c["other"]
        print(f"{comp:34s} {c['forward']:8.1f} {c['backward']:8.1f} {c['other']:8.1f} {t:8.1f} {t / total:6.1%} "
              f"{c['gemm']:10.1f}")
    if a.ops:
        print(f"top ops of {a.ops}:")
        rows = [(k, v) for k, v in OPS.items() if k[0] == a.ops]
        for (comp, phase, name), us in sorted(rows, key=lambda kv: -kv[1])[:20]:
            print(f"  {phase:9s} {name:40s} {us / 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
