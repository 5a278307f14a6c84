"""Pipeline parallelism: stage split, p2p with shape exchange, schedules (no pipeline, 1F1B, interleaved), trace.

Knows nothing of DeepSeek: a model chunk is any nn.Module with ``set_input_tensor(tensor)``; the loss comes
from the user's ``forward_step_func`` / ``loss_func`` (see schedules.py). The embedding tie between the first
and last stage (tied head, MTP's shared embedding) is kept in embedding_sync.py.
"""
from .embedding_sync import (allreduce_embedding_grads, mark_shared_embedding, shared_embedding_params,
                             sync_embedding_weights)
from .p2p import P2PCommunicator
from .schedules import (PipelineScheduleError, count_global_tokens, forward_backward_1f1b,
                        forward_backward_interleaved, forward_backward_no_pipelining, get_forward_backward_func)
from .stage_split import ChunkSpec, chunk_specs, is_first_chunk, is_last_chunk, model_chunk_specs, stage_layer_ids
from .trace import ScheduleTrace, TraceEvent

__all__ = ["stage_layer_ids", "model_chunk_specs", "chunk_specs", "ChunkSpec", "is_first_chunk", "is_last_chunk",
           "get_forward_backward_func", "forward_backward_no_pipelining", "forward_backward_1f1b",
           "forward_backward_interleaved", "count_global_tokens", "PipelineScheduleError", "P2PCommunicator",
           "ScheduleTrace", "TraceEvent", "allreduce_embedding_grads", "sync_embedding_weights",
           "mark_shared_embedding", "shared_embedding_params"]
