"""One reduction group named for the loss (parallel_state.LOSS_GROUP, ``groups.loss``): the global token count, the
DDP dense-gradient reduction and the aux-loss scale all use it, so that context parallelism later changes one
place; and ``--context-parallel-size`` > 1 is refused at start-up until context parallelism exists (before, it
was accepted, nothing split the sequence, dense grads were reduced over dp x cp while tokens were counted over
dp only)."""
from __future__ import annotations

import pytest

from tests.harness import run_distributed
from tests.test_trainer_matrix import MODEL


def test_context_parallel_is_refused_at_start_up(capsys, monkeypatch):
    from megatron_ascend import pretrain
    from megatron_ascend.arguments import build_configs, parse_args
    from megatron_ascend.config import ConfigError
    with pytest.raises(ConfigError, match="--context-parallel-size 2: context parallelism is not built yet"):
        build_configs(parse_args(MODEL.split() + ["--context-parallel-size", "2"]), 2)
    monkeypatch.setenv("WORLD_SIZE", "2")  # a world the size fits: the refusal, not the size rule, answers
    rc = pretrain.main(MODEL.split() + ["--context-parallel-size", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "use --context-parallel-size 1" in err[0]


def _body():
    import torch

    from megatron_ascend import parallel_state
    from megatron_ascend.moe.load_balancing import MoEAuxLossAutoScaler
    from megatron_ascend.training import trainer as trainer_mod
    from megatron_ascend.training.entry import parse
    from megatron_ascend.training.trainer import Trainer
    # world 4 = PP 2 x DP 2 with EP 2 and the distributed optimizer
    tr = Trainer(parse(MODEL.split() + ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                                        "--pipeline-model-parallel-layout", "Et|ttmL", "--use-distributed-optimizer",
                                        "--train-iters", "1"], "pretrain"),
                 print_fn=lambda s: None)
    g = tr.groups
    seen = {}
    count = trainer_mod.global_token_count

    def spy(batches, group):
        seen["token group"] = group
        return count(batches, group)

    trainer_mod.global_token_count = spy
    try:
        _, _, _, _, tokens = tr.train_step()
    finally:
        trainer_mod.global_token_count = count
        tr.close()
    dense = [b for c in tr.model_chunks for b in c.grad_buffers if not b.is_expert]
    return {
        "loss ranks": g.ranks[parallel_state.LOSS_GROUP], "dp ranks": g.ranks["dp"],
        "token count over the loss group": seen["token group"] is g.loss,
        "tokens": tokens, "micro": tr.num_micro, "seq": tr.train_cfg.seq_length, "mbs": tr.train_cfg.micro_batch_size,
        "dense grads over the loss group": bool(dense) and all(b.group is g.loss and b.group_name ==
                                                               parallel_state.LOSS_GROUP for b in dense),
        "aux scale x micro x loss size": MoEAuxLossAutoScaler.scale * tr.num_micro * g.loss_size,
        "loss size": g.loss_size, "finite": bool(torch.isfinite(torch.tensor(tokens))),
    }


def test_token_count_ddp_reduction_and_aux_scale_share_the_loss_group():
    for r in run_distributed(4, _body, timeout=300):
        assert r["loss ranks"] == r["dp ranks"] and r["loss size"] == 2  # cp = 1: the loss group is dp
        assert r["token count over the loss group"] and r["dense grads over the loss group"]
        assert r["aux scale x micro x loss size"] == pytest.approx(1.0, rel=1e-12)
        # every loss token of the global batch, counted once: micro-batches x dp ranks x tokens (mock: all count)
        assert r["tokens"] == r["micro"] * r["loss size"] * r["mbs"] * r["seq"]
