"""The planner's DeepSeek-V4 terms against the model as built (models/deepseek_v4).

* Parameters: every rank of several TP / PP / EP / SP layouts (uneven stages, MTP on the last stage, an MTP
  layer whose attention is CSA, two MTP depths) holds exactly the dense / expert / kept-fp32 elements that
  planner.params says. Ranks are built one after another in this process on torch's "fake" process-group
  backend (construction runs no collective that matters), so eight ranks cost about a second.
"""
import pytest
import torch

from tests import v4_reference as R


def v4_config(**over):
    from megatron_ascend.config import ModelConfig
    return ModelConfig.from_hf_dict(dict(R.tiny_kwargs(**over), model_type="deepseek_v4"))


# the second config lists the MTP layers' ratios (CSA, then sliding) and has two MTP depths
CONFIGS = {
    "tiny": {},
    "mtp2_csa": dict(num_nextn_predict_layers=2, compress_ratios=[0, 4, 8, 4, 8, 4, 0]),
}
LAYOUTS = [  # tp, pp, ep, sp, first, last
    (2, 1, 2, True, None, None),
    (2, 1, 4, False, None, None),
    (1, 2, 2, False, None, 2),
    (2, 2, 2, True, 3, None),
    (2, 2, 4, False, None, 2),
]


def _fake_rank(world, rank):
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())


def _built_counts(cfg, par, rank):
    """(dense, expert, fp32 after the trainer's bf16 cast) numel of this rank's chunks, and its pp rank."""
    import torch.distributed as dist
    from megatron_ascend.models import build_model
    from megatron_ascend.parallel_state import destroy_model_parallel, initialize_model_parallel
    from megatron_ascend.pipeline_parallel.stage_split import chunk_specs
    from megatron_ascend.placement import placement_of
    from megatron_ascend.training.parts import _cast_keep_fp32_buffers
    placement = placement_of(cfg, par)
    _fake_rank(par.world_size, rank)
    try:
        g = initialize_model_parallel(par, embedding_pp_ranks=placement.embedding_pp_ranks)
        dense = expert = fp32 = 0
        for spec in chunk_specs(placement, g.pp_rank):
            m = build_model(cfg, par, g, pre_process=spec.pre_process, post_process=spec.post_process,
                            layer_ids=spec.layer_ids, include_mtp=spec.include_mtp, mtp_in_input=spec.mtp_in_input,
                            padded_vocab_size=cfg.vocab_size)
            _cast_keep_fp32_buffers(m, torch.bfloat16)
            for p in m.parameters():
                if getattr(p, "is_expert", False):
                    expert += p.numel()
                else:
                    dense += p.numel()
                    fp32 += p.numel() if p.dtype == torch.float32 else 0
        return (dense, expert, fp32), g.pp_rank
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rank_params_equal_built_model(name):
    from megatron_ascend.config import ParallelConfig
    from megatron_ascend.planner.params import rank_params, stage_split, total_params
    cfg = v4_config(**CONFIGS[name])
    assert total_params(cfg) == sum(p.numel() for p in _single(cfg).parameters())
    for tp, pp, ep, sp, first, last in LAYOUTS:
        world = tp * pp * 2
        par = ParallelConfig(world_size=world, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                             expert_model_parallel_size=ep, expert_tensor_parallel_size=1, sequence_parallel=sp,
                             decoder_first_pipeline_num_layers=first, decoder_last_pipeline_num_layers=last)
        split = stage_split(cfg, pp, 1, first, last)
        for rank in range(world):
            built, p = _built_counts(cfg, par, rank)
            c = rank_params(cfg, split, p, tp, ep, 1)
            assert (c.dense, c.expert, c.fp32) == built, (name, tp, pp, ep, sp, rank, built)


def _single(cfg):
    from megatron_ascend.models import build_model
    return build_model(cfg)
