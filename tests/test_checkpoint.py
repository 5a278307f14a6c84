"""Sharded checkpoints: resharding across (TP, PP, EP, ETP, DP, distributed-optimizer) layouts, bitwise;
atomic commit under a crash; retention; async save; RNG restore at the same layout; clear errors.

The toy model marks its parameters exactly like the real TP / EP layers (column: dim 0 over tp, row: dim 1
over tp, experts: dim 0 over ep and the ffn dim over etp, ``is_expert``), names layers by global index and
splits them over pipeline stages. Gathering to full tensors in these tests uses ``param.shard`` directly
(not the checkpoint code). A stand-in for the distributed optimizer (flat contiguous ranges per dp rank)
exercises ``sharded_param_state()``.
"""
import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from tests.harness import run_distributed

V, H, FFN, E, I, L = 16, 8, 12, 4, 6, 4


# ---------------------------------------------------------------------------------------------- toy model
def _p(shape):
    return torch.nn.Parameter(torch.zeros(shape))


def build_toy(groups, seed, vocab=V):
    """Toy MoE 'model' with Megatron-like sharding. groups=None: single process, full tensors."""
    from megatron_ascend.tensor_parallel.sharding import init_normal_, mark_sharded

    def ax(name):
        if groups is None:
            return (name, 0, 1)
        return (name, groups.index(name), groups.size(name))

    tp, ep, etp = ax("tp"), ax("ep"), ax("etp")
    pp_rank, pp_size = (groups.pp_rank, groups.pp_size) if groups is not None else (0, 1)
    per = L // pp_size
    root = torch.nn.Module()
    root.model = torch.nn.Module()
    names = {}
    if pp_rank == 0:
        root.model.embed_tokens = torch.nn.Module()
        root.model.embed_tokens.weight = mark_sharded(_p((vocab // tp[2], H)), {0: tp})
    root.model.layers = torch.nn.ModuleDict()
    for li in range(pp_rank * per, (pp_rank + 1) * per):
        lay = torch.nn.Module()
        lay.input_layernorm = torch.nn.Module()
        lay.input_layernorm.weight = mark_sharded(_p((H,)))
        lay.self_attn = torch.nn.Module()
        lay.self_attn.q_b_proj = torch.nn.Module()
        lay.self_attn.q_b_proj.weight = mark_sharded(_p((FFN // tp[2], H)), {0: tp})
        lay.self_attn.o_proj = torch.nn.Module()
        lay.self_attn.o_proj.weight = mark_sharded(_p((H, FFN // tp[2])), {1: tp})
        lay.mlp = torch.nn.Module()
        lay.mlp.gate = torch.nn.Module()
        lay.mlp.gate.weight = mark_sharded(_p((E, H)))
        lay.mlp.gate.register_buffer("e_score_correction_bias", torch.zeros(E))
        lay.mlp.experts = torch.nn.Module()
        lay.mlp.experts.gate_proj = mark_sharded(_p((E // ep[2], I // etp[2], H)), {0: ep, 1: etp}, is_expert=True)
        lay.mlp.experts.down_proj = mark_sharded(_p((E // ep[2], H, I // etp[2])), {0: ep, 2: etp}, is_expert=True)
        root.model.layers[str(li)] = lay
    if pp_rank == pp_size - 1:
        root.model.norm = torch.nn.Module()
        root.model.norm.weight = mark_sharded(_p((H,)))
        root.lm_head = torch.nn.Module()
        root.lm_head.weight = mark_sharded(_p((vocab // tp[2], H)), {0: tp})
    for name, t in root.state_dict(keep_vars=True).items():
        init_normal_(t, name, 0.5, seed, expert_dim=0 if ".experts." in name else None)
    return root


def fake_grads(model, seed):
    from megatron_ascend.tensor_parallel.sharding import init_normal_
    for name, p in model.named_parameters():
        p.grad = torch.zeros_like(p)
        init_normal_(p.grad, name, 1.0, seed, expert_dim=0 if ".experts." in name else None)
        p.grad.shard = p.shard


class FlatShardOptimizer:
    """Stand-in for the distributed optimizer: each dp (experts: edp) rank owns a contiguous range of the
    flat concatenation of the local params; state tensors are 1-D shards of that range."""

    def __init__(self, model, groups):
        self.entries = []
        self.step_count = 0
        dense = [p for p in model.parameters() if not p.is_expert]
        expert = [p for p in model.parameters() if p.is_expert]
        for params, grp in ((dense, "dp"), (expert, "edp")):
            r, n = (groups.index(grp), groups.size(grp)) if groups is not None else (0, 1)
            total = sum(p.numel() for p in params)
            per = -(-total // n)
            lo, hi = r * per, min((r + 1) * per, total)
            off = 0
            for p in params:
                s, e = max(lo, off) - off, min(hi, off + p.numel()) - off
                if s < e:
                    st = {"exp_avg": torch.zeros(e - s), "exp_avg_sq": torch.zeros(e - s),
                          "main_param": torch.zeros(e - s), "step": torch.tensor(0.0)}
                    self.entries.append((p, st, (s, e)))
                off += p.numel()

    def sharded_param_state(self):
        return list(self.entries)

    def state_dict_common(self):
        return {"step": self.step_count}

    def load_state_dict_common(self, d):
        self.step_count = d["step"]

    def fake_step(self, model, seed):
        """Layout-independent update of params and state (no collectives needed)."""
        from megatron_ascend.tensor_parallel.sharding import init_normal_
        names = {id(p): n for n, p in model.named_parameters()}
        self.step_count += 1
        with torch.no_grad():
            for p in model.parameters():
                d = torch.zeros_like(p)
                d.shard = p.shard
                init_normal_(d, names[id(p)], 0.1, seed, expert_dim=0 if p.is_expert else None)
                p.add_(d)
            for p, st, (s, e) in self.entries:
                d = torch.zeros_like(p)
                d.shard = p.shard
                init_normal_(d, names[id(p)] + ".m", 1.0, seed, expert_dim=0 if p.is_expert else None)
                st["exp_avg"].add_(d.view(-1)[s:e])
                st["exp_avg_sq"].add_(d.view(-1)[s:e] ** 2)
                st["main_param"].copy_(p.detach().view(-1)[s:e])
                st["step"].add_(1)


def local_pieces(model, opt):
    """[(key, global shape, slices, tensor)] for params/buffers and optimizer state, from param.shard."""
    from megatron_ascend.tensor_parallel.sharding import shard_spec
    out = []
    for name, t in model.state_dict(keep_vars=True).items():
        spec = shard_spec(t)
        out.append((name, spec.global_shape(t.shape), spec.slices(t.shape), t.detach().clone(), None))
    names = {id(p): n for n, p in model.named_parameters()}
    if isinstance(opt, torch.optim.Optimizer):
        for p, stt in opt.state.items():
            spec = shard_spec(p)
            for k, v in stt.items():
                if v.dim() == 0:
                    out.append((f"opt/{names[id(p)]}/{k}", (), (), v.clone(), None))
                else:
                    out.append((f"opt/{names[id(p)]}/{k}", spec.global_shape(p.shape), spec.slices(p.shape),
                                v.clone(), None))
    elif opt is not None:
        for p, stt, (s, e) in opt.entries:
            spec = shard_spec(p)
            for k, v in stt.items():
                if v.dim() == 0:
                    out.append((f"opt/{names[id(p)]}/{k}", (), (), v.clone(), None))
                else:
                    out.append((f"opt/{names[id(p)]}/{k}", spec.global_shape(p.shape), spec.slices(p.shape),
                                v.clone(), (tuple(p.shape), s, e)))
    return out


def gather_full(model, opt):
    """Full tensors on rank 0 (None elsewhere); asserts replicas agree bitwise and every element is covered."""
    import torch.distributed as dist
    pieces = local_pieces(model, opt)
    allp = [None] * dist.get_world_size()
    dist.all_gather_object(allp, pieces)
    if dist.get_rank() != 0:
        return None
    full, seen = {}, {}
    for rank_pieces in allp:
        for key, gshape, sl, t, flat in rank_pieces:
            if key not in full:
                full[key] = torch.full(gshape, float("nan"), dtype=t.dtype)
                seen[key] = torch.zeros(gshape, dtype=torch.bool)
            if flat is None:
                region, mask = t, torch.ones(t.shape, dtype=torch.bool)
            else:
                shape, s, e = flat
                region = torch.full(shape, float("nan"), dtype=t.dtype)
                region.view(-1)[s:e] = t
                mask = torch.zeros(shape, dtype=torch.bool)
                mask.view(-1)[s:e] = True
            old, oldm = full[key][sl], seen[key][sl]
            both = mask & oldm
            assert torch.equal(old[both], region[both]), f"replicas of {key} differ"
            old[mask] = region[mask]
            oldm |= mask
    for key in full:
        assert bool(seen[key].all()), f"{key} not fully covered"
    return {k: v.numpy() for k, v in full.items()}  # tensors do not survive the result queue


def _groups(world, tp=1, pp=1, ep=1, etp=None, dist_opt=False):
    from megatron_ascend.config import ParallelConfig
    from megatron_ascend.parallel_state import initialize_model_parallel
    return initialize_model_parallel(ParallelConfig(
        world_size=world, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=etp, use_distributed_optimizer=dist_opt))


def _draws():
    return (torch.rand(3).tolist(), random.random(), float(np.random.rand()))


# ---------------------------------------------------------------------------------------------- world bodies
def body_save_layout_a(ckpt_dir):
    """TP2 PP2 EP2 ETP2 (DP2) on 8 ranks, torch Adam."""
    from megatron_ascend.checkpointing import save_checkpoint
    from megatron_ascend.checkpointing.dcp_io import tensor_index
    groups = _groups(8, tp=2, pp=2, ep=2)
    model = build_toy(groups, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    fake_grads(model, seed=11)
    opt.step()
    sched.step()
    torch.manual_seed(1000 + groups.rank)
    random.seed(2000 + groups.rank)
    np.random.seed(3000 + groups.rank)
    save_checkpoint(ckpt_dir, 3, [model], opt, sched, groups, {"consumed_train_samples": 96, "note": "a"})
    draws = _draws()
    full = gather_full(model, opt)
    return {"full": full, "draws": draws, "lr": opt.param_groups[0]["lr"],
            "index": tensor_index(os.path.join(ckpt_dir, "iter_0000003")) if groups.rank == 0 else None}


def body_load_layout_b(dir_a, dir_b):
    """TP1 PP1 EP4 on 4 ranks with the flat-shard (distributed) optimizer: load A, step, save B."""
    from megatron_ascend.checkpointing import CheckpointError, load_checkpoint, save_checkpoint
    groups = _groups(4, tp=1, pp=1, ep=4, dist_opt=True)
    out = {}
    # a model of another shape: one clear error on every rank
    bad = build_toy(groups, seed=5, vocab=V + 4)
    try:
        load_checkpoint(dir_a, [bad], None, None, groups, no_load_rng=True)
        out["err"] = None
    except CheckpointError as e:
        out["err"] = str(e)
    model = build_toy(groups, seed=2)
    opt = FlatShardOptimizer(model, groups)
    it, extra = load_checkpoint(dir_a, [model], opt, None, groups)
    out.update(it=it, extra=extra, full_loaded=gather_full(model, opt), step_count=opt.step_count)
    # finetune: weights only
    m2 = build_toy(groups, seed=3)
    o2 = FlatShardOptimizer(m2, groups)
    out["finetune"] = load_checkpoint(dir_a, [m2], o2, None, groups, finetune=True)
    out["finetune_state_zero"] = all(float(v.abs().sum()) == 0 for _, st, _ in o2.entries
                                     for k, v in st.items() if k != "main_param")
    opt.fake_step(model, seed=21)
    save_checkpoint(dir_b, 4, [model], opt, None, groups, {"consumed_train_samples": 128})
    out["full_b"] = gather_full(model, opt)
    return out


def body_load_layout_a(dir_a, dir_b):
    """Back at TP2 PP2 EP2 ETP2 with torch Adam: load B (resharded) and A (same layout: RNG restored)."""
    from megatron_ascend.checkpointing import load_checkpoint
    groups = _groups(8, tp=2, pp=2, ep=2)
    model = build_toy(groups, seed=7)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    it_b, _ = load_checkpoint(dir_b, [model], opt, None, groups)
    full_b = gather_full(model, opt)
    model = build_toy(groups, seed=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    it_a, extra_a = load_checkpoint(dir_a, [model], opt, sched, groups)
    draws = _draws()
    return {"it_b": it_b, "full_b": full_b, "it_a": it_a, "extra_a": extra_a, "draws": draws,
            "full_a": gather_full(model, opt), "lr": opt.param_groups[0]["lr"], "last_epoch": sched.last_epoch}


def body_async_and_retain(root):
    """2 ranks (TP2): async saves with retention; the loaded state is the last saved one."""
    import torch.distributed as dist
    from megatron_ascend.checkpointing import load_checkpoint, save_checkpoint, wait_for_pending_save
    groups = _groups(2, tp=2)
    model = build_toy(groups, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for it in range(1, 5):
        fake_grads(model, seed=it)
        opt.step()
        save_checkpoint(root, it, [model], opt, None, groups, {"it": it}, save_retain=2, async_save=True)
        if it == 4:
            expect = gather_full(model, opt)
            with torch.no_grad():  # mutating after the call must not reach the staged copy
                for p in model.parameters():
                    p.add_(1.0)
    wait_for_pending_save()
    dist.barrier()
    listing = sorted(os.listdir(root))
    model2 = build_toy(groups, seed=9)
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    it, extra = load_checkpoint(root, [model2], opt2, None, groups)
    return {"listing": listing, "it": it, "extra": extra, "expect": expect, "got": gather_full(model2, opt2)}


# ---------------------------------------------------------------------------------------------- tests
def _assert_same(a, b, keys_filter=lambda k: True, what=""):
    ka = {k for k in a if keys_filter(k)}
    kb = {k for k in b if keys_filter(k)}
    assert ka == kb, f"{what}: keys differ: {sorted(ka ^ kb)[:5]}"
    for k in ka:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), f"{what}: {k} differs"


def test_reshard_8_to_4_and_back_bitwise(tmp_path):
    dir_a, dir_b = str(tmp_path / "a"), str(tmp_path / "b")
    ra = run_distributed(8, body_save_layout_a, dir_a, timeout=240)
    full_a = ra[0]["full"]
    # the saver's gathered state equals an independent single-process build (layout-independent init + shard)
    ref = build_toy(None, seed=1)
    for name, t in ref.state_dict().items():
        assert name in full_a
    # dedup: every stored tensor covers its global volume exactly once; only one replica wrote each box
    index = ra[0]["index"]
    assert set(index) >= set(ref.state_dict())
    from megatron_ascend.checkpointing.dcp_io import read_metadata
    md = read_metadata(os.path.join(dir_a, "iter_0000003"))
    for k, v in md.state_dict_metadata.items():
        vol = sum(int(np.prod(c.sizes)) for c in v.chunks)
        assert vol == int(np.prod(v.size)), f"{k}: stored {vol} elements for a tensor of {int(np.prod(v.size))}"
    assert sum(1 for k in md.state_dict_metadata if k.startswith("rng/")) >= 8 * 3  # per global rank
    common = json.load(open(os.path.join(dir_a, "iter_0000003", "common.json")))
    assert common["layout"]["tp"] == 2 and common["layout"]["pp"] == 2 and common["iteration"] == 3

    rb = run_distributed(4, body_load_layout_b, dir_a, dir_b, timeout=240)
    b0 = rb[0]
    assert b0["err"] is not None and "global shape" in b0["err"] and "embed_tokens" in b0["err"]
    assert all(r["err"] == b0["err"] for r in rb)
    assert b0["it"] == 3 and b0["extra"] == {"consumed_train_samples": 96, "note": "a"}
    assert b0["finetune"] == (0, {}) and all(r["finetune_state_zero"] for r in rb)
    loaded = b0["full_loaded"]
    # weights and Adam moments: bitwise; main_param (absent in A: fp32 training) came from the weights
    _assert_same({k: v for k, v in full_a.items() if not k.endswith("/step")},
                 {k: v for k, v in loaded.items() if not k.endswith("/main_param") and not k.endswith("/step")},
                 what="A->B")
    for k, v in loaded.items():
        if k.endswith("/main_param"):
            assert np.array_equal(v, full_a[k.split("/")[1]]), k
        if k.endswith("/step"):
            assert float(v) == 1.0

    rc = run_distributed(8, body_load_layout_a, dir_a, dir_b, timeout=240)
    c0 = rc[0]
    assert c0["it_b"] == 4 and c0["it_a"] == 3 and c0["extra_a"]["consumed_train_samples"] == 96
    full_b = b0["full_b"]
    _assert_same({k: v for k, v in full_b.items() if not k.endswith("/main_param")}, c0["full_b"], what="B->A")
    _assert_same(full_a, c0["full_a"], what="A->A")
    assert c0["lr"] == ra[0]["lr"] and c0["last_epoch"] == 1
    # same layout: every rank's RNG streams continue exactly where the saver's did
    for r in range(8):
        assert rc[r]["draws"] == ra[r]["draws"], f"rank {r} RNG not restored"


def test_async_save_and_retain(tmp_path):
    root = str(tmp_path / "ck")
    res = run_distributed(2, body_async_and_retain, root, timeout=180)
    r0 = res[0]
    assert r0["listing"] == ["iter_0000003", "iter_0000004", "latest_checkpointed_iteration.txt"], r0["listing"]
    assert r0["it"] == 4 and r0["extra"] == {"it": 4}
    _assert_same(r0["expect"], r0["got"], what="async")


_CRASH_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {repo!r})
    from tests.test_checkpoint import build_toy
    from megatron_ascend.checkpointing import save_checkpoint, checkpoint as ck
    from megatron_ascend.checkpointing import dcp_io
    root, stage = sys.argv[1], sys.argv[2]
    model = build_toy(None, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    save_checkpoint(root, 1, [model], opt, None, None, {{"it": 1}})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    if stage == "mid_write":  # die while DCP writes tensor data
        orig = dcp_io.ChunkSavePlanner.resolve_data
        count = [0]
        def dying(self, item):
            count[0] += 1
            if count[0] == 5:
                os._exit(3)
            return orig(self, item)
        dcp_io.ChunkSavePlanner.resolve_data = dying
    else:
        ck._FAULT_HOOK = lambda s: os._exit(3) if s == stage else None
    save_checkpoint(root, 2, [model], opt, None, None, {{"it": 2}})
    os._exit(0)
""")


STAGES = ["mid_write", "after_write", "before_rename", "before_tracker"]


def test_killed_save_leaves_previous_checkpoint(tmp_path):
    """A process killed (os._exit) at each point of a save: the tracker still names the previous checkpoint
    and load returns it bitwise. The four kills run as parallel subprocesses."""
    from megatron_ascend.checkpointing import load_checkpoint
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "crash.py"
    script.write_text(_CRASH_SCRIPT.format(repo=repo))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), MEGATRON_ASCEND_DEVICE="cpu")
    procs = {stage: subprocess.Popen([sys.executable, str(script), str(tmp_path / stage), stage], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for stage in STAGES}
    ref = build_toy(None, seed=1)
    for stage, proc in procs.items():
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 3, f"{stage}: {err[-2000:]}"
        root = str(tmp_path / stage)
        assert open(os.path.join(root, "latest_checkpointed_iteration.txt")).read().strip() == "1", stage
        if stage != "before_tracker":
            assert os.path.isdir(os.path.join(root, "iter_0000002.tmp")), stage
            assert not os.path.exists(os.path.join(root, "iter_0000002")), stage
        model = build_toy(None, seed=5)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        it, extra = load_checkpoint(root, [model], opt, None, None)
        assert it == 1 and extra == {"it": 1}, stage
        assert not opt.state, "the saver had not stepped: no optimizer state may appear"
        for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
            assert torch.equal(a, b), (stage, n)


def test_incomplete_only_and_missing_dirs(tmp_path):
    from megatron_ascend.checkpointing import CheckpointError, load_checkpoint, save_checkpoint
    model = build_toy(None, seed=1)
    assert load_checkpoint(str(tmp_path / "nothing"), [model]) == (0, {})  # Megatron: start from scratch
    root = tmp_path / "ck"
    (root / "iter_0000005.tmp").mkdir(parents=True)
    (root / "iter_0000004").mkdir()  # no completion marker
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(str(root), [model])
    save_checkpoint(str(root), 6, [model], None, None, None, {})
    (root / "latest_checkpointed_iteration.txt").write_text("9")  # tracker points at nothing: newest complete
    assert load_checkpoint(str(root), [model])[0] == 6
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(CheckpointError, match="no-load-optim"):
        load_checkpoint(str(root), [model], opt)
    assert load_checkpoint(str(root), [model], opt, no_load_optim=True)[0] == 6
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(str(root), 7, [model], None, None, None, {"bad": object()})
    # the failed save left nothing behind that load would take
    assert load_checkpoint(str(root / "iter_0000006"), [model])[0] == 6


def test_flat_range_boxes_cover_exactly():
    from megatron_ascend.checkpointing.dcp_io import flat_range_boxes
    shape = (3, 4, 5)
    n = 60
    for s in range(0, n, 7):
        for e in range(s, n + 1, 5):
            cover = torch.zeros(shape, dtype=torch.int64)
            flat_pos = []
            for off, size in flat_range_boxes(shape, s, e):
                sl = tuple(slice(o, o + z) for o, z in zip(off, size))
                cover[sl] += 1
                flat_pos.append(torch.arange(n).view(shape)[sl].reshape(-1))
            want = torch.zeros(n, dtype=torch.int64)
            want[s:e] = 1
            assert torch.equal(cover.view(-1), want), (s, e)
            if flat_pos:
                assert torch.equal(torch.cat(flat_pos), torch.arange(s, e)), (s, e)
            assert len(flat_range_boxes(shape, s, e)) <= 5
