"""DeepSeek-V4 through the trainer (``megatron_ascend.pretrain``'s code path in-process, --model-config with a
transformers-style V4 config.json), fp32, MTP on, sequence aux loss, indexer KL loss and expert-bias updates on:

* 5 steps at TP 2 x PP 2 x EP 2 x DP 2 with sequence parallel and the distributed optimizer (8 ranks), and at
  PP 2 with the MTP block on a stage of its own before the loss stage (layout ``Et*5m|L``, 2 ranks), give the
  lm / MTP losses of the single process within 1e-5 relative (tests/tolerance.py MODEL_REL), every step;
* the checkpoint the 8-rank run saves loads into the single process (resharded: TP / PP / EP / DP and the
  distributed optimizer's shards), with the hash layers' frozen ``tid2eid`` table (set to a custom table before
  training, so it cannot come from the initialisation) and parameters equal to the single process's after the
  same 5 steps (within 5e-4 of each tensor's scale, or 1% of one Adam step); the table is unchanged by training;
* --sft-packing is refused for V4 with one ConfigError."""
import io
import json
import os

import pytest
import torch

from tests import v4_reference as R
from tests.harness import run_distributed

STEPS = 5
REL = 5e-4  # params after 5 Adam steps (below); the losses use the whole-model figure MODEL_REL
LR = 3e-3
FLAGS = (f"--seq-length 32 --micro-batch-size 1 --global-batch-size 8 --lr {LR} --lr-warmup-iters 1 "
         "--moe-aux-loss-coeff 1e-3 --moe-router-bias-update-rate 0.01 --eval-interval 100 --eval-iters 1 "
         "--log-interval 1 --mock-data --seed 11 --vocab-size 96 --make-vocab-size-divisible-by 1")
PARALLEL = ("--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --expert-model-parallel-size 2 "
            "--sequence-parallel --use-distributed-optimizer --decoder-first-pipeline-num-layers 2")


def write_config(root):
    d = dict(R.tiny_kwargs(), model_type="deepseek_v4", dsa_indexer_loss_coeff=0.05, mtp_loss_scaling_factor=0.3)
    path = os.path.join(root, "config.json")
    with open(path, "w") as f:
        json.dump(d, f)
    return path


def custom_table(vocab, n_experts, k):
    g = torch.Generator().manual_seed(99)
    return torch.rand(vocab, n_experts, generator=g).topk(k, dim=-1).indices


def _trainer(argv, stage="pretrain"):
    from megatron_ascend.training.entry import parse
    from megatron_ascend.training.trainer import Trainer
    return Trainer(parse(argv, stage), print_fn=lambda s: None)


def _tables(tr):
    return {n: b.detach().clone() for c in tr.model_chunks for n, b in c.module.named_buffers()
            if n.endswith("tid2eid")}


def _run(config, extra, set_table):
    tr = _trainer(f"--model-config {config} {FLAGS} {extra}".split())
    if set_table:
        cfg = tr.model_cfg
        for c in tr.model_chunks:
            for n, b in c.module.named_buffers():
                if n.endswith("tid2eid"):
                    b.copy_(custom_table(cfg.vocab_size, cfg.n_routed_experts, cfg.num_experts_per_tok))
    before = _tables(tr)
    tr.init_params = _full_params(tr) if tr.world == 1 else None
    try:
        res = tr.train()
    finally:
        tr.close()
    return tr, res, before


def _full_params(tr):
    """Every parameter gathered to its global tensor (collective over the layout's groups)."""
    from megatron_ascend.tensor_parallel import gather_full
    out = {}
    for c in tr.model_chunks:
        for n, p in c.module.named_parameters():
            out[n] = gather_full(p.detach(), p, tr.groups).clone()
    return out


def _parallel_body(config, ckpt):
    tr, res, before = _run(config, f"{PARALLEL} --train-iters {STEPS} --save {ckpt}", True)
    after = _tables(tr)
    return dict(losses={i: res.losses[i] for i in sorted(res.losses)}, unchanged=all(
        torch.equal(before[k], after[k]) for k in before), n_tables=len(after), rank=torch.distributed.get_rank())


def _standalone_mtp_body(config):
    """PP2 with the MTP block on the first stage, apart from the head + loss (layout ``Et*5m|L``): the streams'
    head inputs cross the stage boundary as cat([head input, MTP head input])."""
    tr, res, _ = _run(config, f"--pipeline-model-parallel-size 2 --pipeline-model-parallel-layout Et*5m|L "
                              f"--train-iters {STEPS}", True)
    return dict(losses={i: res.losses[i] for i in sorted(res.losses)})


def _single_body(config, ckpt):
    tr, res, _ = _run(config, f"--train-iters {STEPS}", True)
    ref_params = _full_params(tr)
    moved = max((ref_params[n] - p).abs().max().item() / p.abs().max().clamp_min(1e-12).item()
                for n, p in tr.init_params.items())
    ref_tables = _tables(tr)
    loaded = _trainer(f"--model-config {config} {FLAGS} --train-iters {STEPS + 1} --load {ckpt}".split())
    got = _full_params(loaded)
    tables = _tables(loaded)
    loaded.close()
    with pytest.raises(Exception, match="sft-packing"):
        _trainer(f"--model-config {config} {FLAGS} --train-iters 1 --sft-packing".split(), "sft")
    out = dict(losses={i: res.losses[i] for i in sorted(res.losses)}, ref_params=ref_params, got=got,
               ref_tables=ref_tables, tables=tables, iteration=loaded.iteration, moved=moved)
    buf = io.BytesIO()  # tensors crossing the forkserver as objects would each hold a shared-memory descriptor
    torch.save(out, buf)
    return buf.getvalue()


def test_v4_trainer_tp2_pp2_ep2_dp2_distopt_equals_single_process_and_reshards(tmp_path):
    from tests.tolerance import MODEL_REL, assert_equal, assert_rel
    config = write_config(str(tmp_path))
    ckpt = str(tmp_path / "ckpt")
    par = run_distributed(8, _parallel_body, config, ckpt, timeout=900)
    par += run_distributed(2, _standalone_mtp_body, config, timeout=600)
    (blob,) = run_distributed(1, _single_body, config, ckpt, timeout=900)
    one = torch.load(io.BytesIO(blob), weights_only=True)
    assert all(r["unchanged"] for r in par if "unchanged" in r) and sum(r.get("n_tables", 0) for r in par) > 0
    assert sorted(one["losses"]) == list(range(1, STEPS + 1))
    for r in par:
        for i in range(1, STEPS + 1):
            for k in ("lm loss", "mtp_1 loss"):
                got, want = r["losses"][i][k], one["losses"][i][k]
                assert_rel(got, want, MODEL_REL, f"rank {r.get('rank')} step {i} {k}")
    assert one["moved"] > 100 * REL, f"the steps hardly changed the parameters ({one['moved']})"
    # the 8-rank checkpoint, loaded into one process
    assert one["iteration"] == STEPS
    assert sorted(one["tables"]) == sorted(one["ref_tables"]) and one["tables"]
    for n, t in one["tables"].items():
        assert_equal(t, one["ref_tables"][n], f"{n} loaded from the 8-rank checkpoint")
        assert not torch.equal(t, torch.zeros_like(t))
    assert sorted(one["got"]) == sorted(one["ref_params"])
    for n, p in one["got"].items():
        # Adam turns the rounding of near-zero gradients (mHC fn / base) into update differences of ~1e-3 of a
        # step; a wrong reshard or a missing term would be a whole step (lr) or the parameter's scale
        assert_rel(p, one["ref_params"][n], REL, f"{n} after {STEPS} steps, loaded from the 8-rank checkpoint",
                   floor=0.01 * LR / REL)
