#!/usr/bin/env python
"""Print every process group of a parallel layout without starting any process.

    python tools/show_layout.py --world-size 8 --tensor-model-parallel-size 2 \
        --pipeline-model-parallel-size 2 --expert-model-parallel-size 2

Takes the same parallel flags as the training entry points (and optionally the model flags / --model-config,
so the model-dependent rules — heads divisible by TP, experts by EP, layers by PP — are checked too, and the layer
placement is printed: which pipeline rank / virtual stage holds the embedding, which layers, MTP and the loss).
"""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ascend.arguments import exit_on_config_error, model_config_from_args, build_parser  # noqa: E402
from megatron_ascend.config import ParallelConfig, validate_all  # noqa: E402
from megatron_ascend.parallel_state import RankLayout  # noqa: E402
from megatron_ascend.placement import placement_of  # noqa: E402


@exit_on_config_error
def main(argv=None):
    p = build_parser(prog="tools/show_layout.py", description=__doc__.split("\n")[0])
    p.add_argument("--world-size", type=int, required=True, help="number of processes (devices) in the job")
    p.add_argument("--rank", type=int, default=None, help="also print this rank's coordinates")
    args = p.parse_args(argv)
    par = ParallelConfig(
        world_size=args.world_size, tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        num_layers_per_virtual_pipeline_stage=args.num_layers_per_virtual_pipeline_stage,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size, sequence_parallel=args.sequence_parallel,
        decoder_first_pipeline_num_layers=args.decoder_first_pipeline_num_layers,
        decoder_last_pipeline_num_layers=args.decoder_last_pipeline_num_layers,
        pipeline_model_parallel_layout=args.pipeline_model_parallel_layout, num_layer_list=args.num_layer_list,
        noop_layers=args.noop_layers)
    placement = None
    if args.model_config or args.num_layers:
        model = model_config_from_args(args)
        if par.noop_layers and args.num_layers is not None:  # --num-layers counts the noop slots
            model = dataclasses.replace(model, num_hidden_layers=args.num_layers - len(par.noop_layers))
        validate_all(model, par)
        placement = placement_of(model, par)
    layout = RankLayout(par, None if placement is None else placement.embedding_pp_ranks)
    print(layout.format())
    if placement is not None:
        print(placement.format())
    if args.rank is not None:
        print(f"rank {args.rank}: {layout.coords(args.rank)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
