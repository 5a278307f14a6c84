#!/usr/bin/env python
"""Forward pass of a DeepSeek model (V2 / V3 / V3.2 / V4) at any TP / PP / EP layout; writes logits (and per-token
loss).

    torchrun --nproc-per-node 4 tools/forward.py --load ckpt/run   --input-ids ids.pt --output out.pt \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --expert-model-parallel-size 2
    torchrun --nproc-per-node 4 tools/forward.py --hf-dir DeepSeek-V2-Lite --prompt "Hello" \
        --tokenizer-model DeepSeek-V2-Lite --output out.pt --expert-model-parallel-size 4

Inputs: ``--input-ids`` a file read with ``torch.load(weights_only=True)`` holding a LongTensor [b, s] (or [s]),
or a dict with ``input_ids`` and optionally ``labels`` (same shape; -100 = ignore); or ``--prompt`` (repeatable)
with ``--tokenizer-model`` (a HF tokenizer directory; ``--tokenizer-type`` SentencePieceTokenizer for a .model).
Weights: ``--load`` our checkpoint (weights only) or ``--hf-dir`` a HuggingFace directory read directly (any
naming, V4's original included; FP8 / FP4 dequantised). Output (``torch.save``, written by one rank):
``{"logits": [b, s, vocab] float32 (the real vocab, no padding), "input_ids": [b, s], "loss": [b, s] float32
per-token cross entropy (0 where ignored) when labels are given, "labels": ...}``. ``--labels-from-input``
uses the next token as the label.

One micro-batch runs through the pipeline stages (p2p from pipeline_parallel); every data-parallel replica
runs the same batch. Virtual pipeline stages are not used here (the layout only changes how the same
weights are split). The work is in ``run_forward(args)`` so tests can call it inside gloo workers.
"""
import argparse
import os
import sys
from collections.abc import Mapping

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_ascend.arguments import exit_on_config_error  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(prog="tools/forward.py", description=__doc__.split("\n")[0], allow_abbrev=False)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="our checkpoint (a --save directory or one iter_XXXXXXX / release directory)")
    src.add_argument("--hf-dir", help="a HuggingFace DeepSeek directory (config.json + safetensors)")
    inp = p.add_mutually_exclusive_group(required=True)
    inp.add_argument("--input-ids", help="torch.save'd LongTensor [b, s] or dict(input_ids=..., labels=...)")
    inp.add_argument("--prompt", action="append", help="text prompt (repeat for a batch; needs a tokenizer)")
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--tokenizer-type", default="HuggingFaceTokenizer")
    p.add_argument("--labels-from-input", action="store_true", help="labels = input shifted left by one")
    p.add_argument("--output", required=True)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-tensor-parallel-size", type=int, default=1)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--model-config", default=None, help="config.json when --load records no model config")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    return p


class LazyHF(Mapping):
    """canonical name -> tensor over a HF directory in any naming (checkpointing/hf_dir.py), read on access;
    FP8 / FP4 weights dequantised to ``dtype``, other tensors as stored."""

    def __init__(self, hf_dir, dtype=torch.float32):
        from megatron_ascend.checkpointing.hf_dir import read_hf_dir
        self.hf = read_hf_dir(hf_dir)
        self.dtype = dtype
        self.names = list(self.hf.tensors)

    def __getitem__(self, name):
        from megatron_ascend.checkpointing.hf_dir import load_tensor
        src = self.hf.tensors[name]  # KeyError when absent
        return load_tensor(src, self.dtype if src.quant else None)

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


def _read_inputs(args, vocab_size):
    labels = None
    if args.input_ids:
        obj = torch.load(args.input_ids, weights_only=True)
        if isinstance(obj, dict):
            ids, labels = obj["input_ids"], obj.get("labels")
        else:
            ids = obj
    else:
        if not args.tokenizer_model:
            raise SystemExit("error: --prompt needs --tokenizer-model")
        from megatron_ascend.data.tokenizer import build_tokenizer
        tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model, vocab_size=vocab_size)
        rows = [tok.tokenize(p) for p in args.prompt]
        s = max(len(r) for r in rows)
        ids = torch.tensor([r + [tok.eos] * (s - len(r)) for r in rows], dtype=torch.long)
    ids = ids.long()
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if labels is not None:
        labels = labels.long().view(ids.shape)
    elif args.labels_from_input:
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
    if int(ids.max()) >= vocab_size or int(ids.min()) < 0:
        raise SystemExit(f"error: token ids must lie in [0, {vocab_size}); got [{int(ids.min())}, {int(ids.max())}]")
    return ids, labels


def run_forward(args):
    """Returns the output dict on the writing rank (None elsewhere); writes ``args.output`` there."""
    from megatron_ascend import platform
    from megatron_ascend.checkpointing import load_checkpoint, find_checkpoint, read_common
    from megatron_ascend.config import ModelConfig, ParallelConfig, validate_all
    from megatron_ascend.models import build_model
    from megatron_ascend.models.deepseek import load_hf_state_dict_into
    from megatron_ascend.parallel_state import initialize_model_parallel
    from megatron_ascend.pipeline_parallel import P2PCommunicator, model_chunk_specs
    from megatron_ascend.tensor_parallel import gather_from_tensor_model_parallel_region

    plat = platform.init_distributed()
    device = plat.device()
    if args.hf_dir:
        cfg = ModelConfig.from_json_file(os.path.join(args.hf_dir, "config.json"))
    elif args.model_config:
        cfg = ModelConfig.from_json_file(args.model_config)
    else:
        path, _ = find_checkpoint(args.load, verify="size")  # load_checkpoint verifies the checksums
        if path is None:
            raise SystemExit(f"error: {args.load} holds no checkpoint")
        d = read_common(path).get("model_config")
        if not d:
            raise SystemExit(f"error: {path} records no model config; pass --model-config")
        cfg = ModelConfig(**d)
    par = ParallelConfig(world_size=dist.get_world_size(), tensor_model_parallel_size=args.tensor_model_parallel_size,
                         pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                         expert_model_parallel_size=args.expert_model_parallel_size,
                         expert_tensor_parallel_size=args.expert_tensor_parallel_size,
                         sequence_parallel=args.sequence_parallel)
    validate_all(cfg, par)
    groups = initialize_model_parallel(par)
    spec = model_chunk_specs(cfg.num_hidden_layers, par.pp, groups.pp_rank)[0]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = build_model(cfg, par, groups, pre_process=spec.pre_process, post_process=spec.post_process,
                        layer_ids=spec.layer_ids, include_mtp=False)
    if args.hf_dir:
        missing, _ = load_hf_state_dict_into(model, LazyHF(args.hf_dir))
        if missing:
            raise SystemExit(f"error: {args.hf_dir} lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    else:
        load_checkpoint(args.load, [model], None, None, groups, finetune=True)
    for name, b in model.named_buffers():  # the router bias stays fp32, like the HF model's gate
        if b.is_floating_point() and "e_score_correction_bias" not in name:
            b.data = b.data.to(dtype)
    for p in model.parameters():  # fp32-kept parameters (V4's norms, mHC, router) stay fp32, as in training
        if not getattr(p, "keep_fp32", False):
            p.data = p.data.to(dtype)
    model.to(device).eval()

    ids, labels = _read_inputs(args, cfg.vocab_size)
    ids = ids.to(device)
    p2p = P2PCommunicator(groups, requires_grad=False)
    with torch.no_grad():
        if not spec.pre_process:
            model.set_input_tensor(p2p.recv_forward())
        out = model(ids)
        if not spec.post_process:
            p2p.send_forward(out)
            p2p.finish()
            return None
    # vocab-parallel logits [s, b, V_pad/tp] -> [b, s, V]
    logits = gather_from_tensor_model_parallel_region(out.float(), groups.tp)
    logits = logits[..., : cfg.vocab_size].transpose(0, 1).contiguous().cpu()
    result = {"logits": logits, "input_ids": ids.cpu()}
    if labels is not None:
        loss = F.cross_entropy(logits.view(-1, cfg.vocab_size), labels.view(-1), reduction="none", ignore_index=-100)
        result.update(loss=loss.view(labels.shape), labels=labels)
    if groups.tp_rank == 0 and groups.dp_rank == 0:
        torch.save(result, args.output)
        return result
    return None


@exit_on_config_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    run_forward(args)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
