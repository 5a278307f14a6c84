"""The planner's inputs read off a live run: the layout, stage split and per-rank parameter count the planner
would assume for a Trainer's configuration, next to what the built model chunks really hold (parameter counts,
distributed-optimizer padding). Used by bench/comm_volume.py and the planner conformance tests to compare the
analytic volumes and model states with counted bytes on real training steps.

Takes any object with a Trainer's attributes (``par``, ``groups``, ``vp``, ``model_cfg``, ``train_cfg``,
``num_micro``, ``model_chunks``); nothing here imports training/.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from .comm import CommOptions
from .layout import Layout
from .params import ParamCount, StageSplit, rank_params, stage_split


@dataclass
class LiveInputs:
    layout: Layout
    split: StageSplit
    count: ParamCount       # the planner's per-rank parameters
    live_dense: int         # numel of this rank's dense / expert params in the built chunks
    live_expert: int
    padding: Dict[bool, int]  # distributed-optimizer grad-buffer padding per kind (is_expert -> elements)

    def comm_options(self, seq_length: int, num_microbatches: int, nbytes: int = 4) -> CommOptions:
        return CommOptions(seq_length=seq_length, num_microbatches=num_microbatches, act_bytes=nbytes,
                           grad_bytes=nbytes, param_bytes=nbytes, dp_padding_elems=self.padding[False],
                           edp_padding_elems=self.padding[True])


def live_inputs(trainer) -> LiveInputs:
    par, g = trainer.par, trainer.groups
    lay = Layout.from_parallel_config(par, micro_batch_size=trainer.train_cfg.micro_batch_size)
    split = stage_split(trainer.model_cfg, par.pp, trainer.vp, par.decoder_first_pipeline_num_layers,
                        par.decoder_last_pipeline_num_layers)
    count = rank_params(trainer.model_cfg, split, g.pp_rank, par.tp, par.ep, par.etp)
    live = {False: 0, True: 0}
    pad = {False: 0, True: 0}
    for c in trainer.model_chunks:
        for p in c.module.parameters():
            live[bool(getattr(p, "is_expert", False))] += p.numel()
        if par.use_distributed_optimizer:
            for b in c.grad_buffers:
                pad[bool(b.is_expert)] += b.numel - b.numel_unpadded
    return LiveInputs(lay, split, count, live[False], live[True], pad)
