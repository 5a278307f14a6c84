"""Pipeline bubble: measured next to the theory (p-1)/(m+p-1) (1F1B) and (p-1)/(v*m+p-1) (interleaved).

    python bench/pipeline_bubble.py                 # p = 2 measured on gloo, p = 4 simulated
    python bench/pipeline_bubble.py --steps 5 --hidden 384

Measured (p = 2, one process and one thread per stage): a stack of matmul + tanh layers, the same number of
layers on every rank (equal per-stage work, no sleeps), run through the real schedules with a ScheduleTrace.
Per step, T = last backward end - first forward start over all ranks; rank r's bubble is 1 - busy_r / T where
busy_r is the sum of its forward and backward step times (so p2p time counts as bubble, as it should). The
median over steps of the mean over ranks is printed with the theory and their ratio.

Simulated (p = 4, which 2 shared cores cannot time honestly): the exact per-rank orders our schedules emit
(traced from a zero-compute run on 4 gloo ranks) are replayed by a discrete-event simulation with the per-layer
forward / backward costs measured above and free communication. This checks that the emitted orders reach the
published bubble, not only the order tests.

Prints ratios; it is not a test and asserts nothing about time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


class MatmulChunk(torch.nn.Module):
    def __init__(self, num_layers: int, hidden: int, pre: bool, post: bool, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(hidden, hidden, generator=g) / hidden ** 0.5) for _ in range(num_layers)])
        self.pre, self.post = pre, post
        self.input_tensor = None

    def set_input_tensor(self, t):
        self.input_tensor = t

    def forward(self, x):
        h = x if self.pre else self.input_tensor
        for w in self.weights:
            h = torch.tanh(h @ w)
        return h


def _forward_step(data_iterator, chunk):
    x = next(data_iterator)
    out = chunk(x)
    return out, (lambda o: ((o * o).sum(), x.shape[0], {}))


def _worker(rank, world, store, cases, layers, hidden, tokens, warmup, steps, exchange_shapes, q):
    import torch.distributed as dist
    os.environ["MEGATRON_ASCEND_DEVICE"] = "cpu"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from megatron_ascend.config import ParallelConfig
    from megatron_ascend.parallel_state import initialize_model_parallel
    from megatron_ascend.pipeline_parallel import ScheduleTrace, get_forward_backward_func
    pg = initialize_model_parallel(ParallelConfig(world_size=world, pipeline_model_parallel_size=world))
    out = []
    for m, v in cases:
        chunks = [MatmulChunk(layers // v, hidden, rank == 0 and c == 0, rank == world - 1 and c == v - 1,
                              seed=1000 * rank + c) for c in range(v)]
        data = [torch.randn(tokens, hidden) for _ in range(m)]
        fb = get_forward_backward_func(world, v)
        runs = []
        for it in range(warmup + steps):
            dist.barrier()
            trace = ScheduleTrace()
            shape = {} if exchange_shapes else dict(tensor_shape=(tokens, hidden), dtype=torch.float32)
            fb(_forward_step, iter(data), chunks, m, pg, num_tokens=float(tokens * m), trace=trace, **shape)
            if it >= warmup:
                runs.append([(e.kind, e.microbatch, e.chunk, e.start, e.end) for e in trace.events])
        out.append(runs)
    dist.barrier()
    dist.destroy_process_group()
    q.put((rank, out))


def run_world(world, cases, layers, hidden, tokens, warmup, steps, exchange_shapes=False):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world, store, cases, layers, hidden, tokens, warmup, steps,
                                                         exchange_shapes, q))
                 for r in range(world)]
        for p in procs:
            p.start()
        res = dict(q.get(timeout=900) for _ in procs)
        for p in procs:
            p.join()
    return [res[r] for r in range(world)]  # [rank][case][step] -> events


def bubble_of(step_events_per_rank):
    t0 = min(e[3] for ev in step_events_per_rank for e in ev)
    t1 = max(e[4] for ev in step_events_per_rank for e in ev)
    busy = [sum(e[4] - e[3] for e in ev) for ev in step_events_per_rank]
    return statistics.mean(1 - b / (t1 - t0) for b in busy)


def theory(p, m, v):
    return (p - 1) / (v * m + p - 1)


def simulate(orders, p, v, t_f, t_b):
    """Replay per-rank orders [(kind, mb, chunk)] with per-chunk costs t_f, t_b and free communication."""
    done = {}  # (rank, kind, mb, chunk) -> finish time
    pos, free = [0] * p, [0.0] * p

    def dep(r, kind, mb, c):
        if kind == "F":
            if r > 0:
                return (r - 1, "F", mb, c)
            return (p - 1, "F", mb, c - 1) if c > 0 else None
        if r == p - 1 and c == v - 1:
            return (r, "F", mb, c)
        return (r + 1, "B", mb, c) if r < p - 1 else (0, "B", mb, c + 1)

    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for r in range(p):
            if pos[r] == len(orders[r]):
                continue
            kind, mb, c = orders[r][pos[r]]
            d = dep(r, kind, mb, c)
            if d is not None and d not in done:
                continue
            start = max(free[r], done[d] if d is not None else 0.0)
            free[r] = start + (t_f if kind == "F" else t_b)
            done[(r, kind, mb, c)] = free[r]
            pos[r] += 1
            remaining -= 1
            progressed = True
        if not progressed:
            raise RuntimeError("the orders deadlock under their data dependencies")
    total = max(free)
    busy = [sum(t_f if k == "F" else t_b for k, _, _ in o) for o in orders]
    return statistics.mean(1 - b / total for b in busy)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--layers", type=int, default=4, help="matmul layers per rank (divisible by every v)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--exchange-shapes", action="store_true",
                    help="send a shape header before every transfer (SFT mode) instead of one fixed shape")
    ap.add_argument("--no-sim", action="store_true", help="skip the p = 4 simulation")
    a = ap.parse_args(argv)

    p = 2
    cases = [(m, 1) for m in (1, 2, 4, 8)] + [(m, 2) for m in (2, 4, 8)]
    res = run_world(p, cases, a.layers, a.hidden, a.tokens, a.warmup, a.steps, a.exchange_shapes)
    print(f"measured on gloo: p={p}, {a.layers} matmul layers [{a.tokens}x{a.hidden}]x[{a.hidden}x{a.hidden}] "
          f"per rank, median of {a.steps} steps, {'shape headers' if a.exchange_shapes else 'fixed shape'}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
    print(f"{'p':>2} {'m':>3} {'v':>2} {'theory':>8} {'measured':>9} {'ratio':>6}")
    f_costs, b_costs = [], []
    for i, (m, v) in enumerate(cases):
        steps = [[res[r][i][s] for r in range(p)] for s in range(a.steps)]
        meas = statistics.median(bubble_of(st) for st in steps)
        th = theory(p, m, v)
        print(f"{p:>2} {m:>3} {v:>2} {th:8.3f} {meas:9.3f} {meas / th:6.2f}")
        for st in steps:
            for ev in st:
                f_costs += [(e[4] - e[3]) * v / a.layers for e in ev if e[0] == "F"]
                b_costs += [(e[4] - e[3]) * v / a.layers for e in ev if e[0] == "B"]
    t_f, t_b = statistics.median(f_costs), statistics.median(b_costs)
    print(f"per-layer cost: forward {t_f * 1e3:.3f} ms, backward {t_b * 1e3:.3f} ms (B/F {t_b / t_f:.2f})")
    if a.no_sim:
        return
    p4 = 4
    sim_cases = [(m, 1) for m in (1, 4, 8, 16)] + [(m, 2) for m in (4, 8, 16)] + [(8, 4)]
    traced = run_world(p4, sim_cases, 4, 8, 4, 0, 1)
    print(f"simulated: p={p4}, orders traced from our schedules, {a.layers} layers per rank at the measured cost, "
          f"free communication")
    print(f"{'p':>2} {'m':>3} {'v':>2} {'theory':>8} {'simulated':>9} {'ratio':>6}")
    for i, (m, v) in enumerate(sim_cases):
        orders = [[(e[0], e[1], e[2]) for e in traced[r][i][0]] for r in range(p4)]
        per_chunk = a.layers / v
        sim = simulate(orders, p4, v, t_f * per_chunk, t_b * per_chunk)
        th = theory(p4, m, v)
        print(f"{p4:>2} {m:>3} {v:>2} {th:8.3f} {sim:9.3f} {sim / th:6.2f}")


if __name__ == "__main__":
    main()
