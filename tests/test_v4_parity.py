"""DeepseekV4ForCausalLM equals transformers' DeepseekV4ForCausalLM (fp32, random weights, offline) on a tiny
config mixing sliding / CSA / HCA attention and hash- / score-routed MoE, over 40 tokens (window 6, 10 CSA
entries of which the top 3 are kept, 5 HCA entries): logits, per-token loss and loss within 1e-5 (assert_rel),
every parameter gradient, and one MTP depth against DeepSeek's MTPBlock built from transformers' pieces
(tests/v4_reference.py) -- at TP 1, TP 2 with and without sequence parallel, EP 2, PP 2 (1F1B schedule) and
TP 2 x PP 2 x EP 2 with sequence parallel on 8 processes (5 layers: uneven stages, 2 + 3 and 3 + 2, the
hash layers on the first stage, the streams [s, b, 4h] crossing the stage boundary). One spawned world per size runs every layout.
Also: the tiny config really exercises the window, the CSA top-k and the HCA entries (widening each changes
transformers' logits)."""
import torch

from tests import v4_reference as R
from tests.harness import run_distributed
from tests.tolerance import MODEL_REL, assert_rel

TOL = MODEL_REL  # the whole-model figure
# gradients: per tensor, relative to its largest reference entry -- or to 1% of the model's largest gradient for
# tensors whose gradient is smaller (the mHC head's scale / base are sums over every token with heavy
# cancellation: 1e-5 in size, their fp32 rounding is that of the terms, not of the sum)
GRAD_TOL, GRAD_FLOOR = 2e-5, 1e-2

_REF = {}


def ref():
    if "r" not in _REF:
        _REF["r"] = R.reference()
    return _REF["r"]


def _groups(par):
    from megatron_ascend.parallel_state import initialize_model_parallel
    return initialize_model_parallel(par) if par.world_size > 1 else None


def _build(cfg, par, pg, sd, pre=True, post=True, layer_ids=None):
    from megatron_ascend.models import build_model
    from megatron_ascend.models.deepseek import load_hf_state_dict_into
    m = build_model(cfg, par, pg, pre_process=pre, post_process=post, layer_ids=layer_ids)
    missing, _ = load_hf_state_dict_into(m, sd)
    assert not missing, missing
    return m


def _finish_grads(chunks, pg):
    """What the DDP wrapper does when every dp rank holds the same batch: SP grads summed over tp, expert grads
    summed over expert-dp and divided by dp (dense grads are then already the average)."""
    import torch.distributed as dist
    from megatron_ascend.tensor_parallel import allreduce_sequence_parallel_grads
    if pg is None:
        return
    for c in chunks:
        allreduce_sequence_parallel_grads(c.parameters(), pg)
        for p in c.parameters():
            if getattr(p, "is_expert", False) and p.grad is not None and pg.dp_size > 1:
                if pg.edp_size > 1:
                    dist.all_reduce(p.grad, group=pg.edp)
                p.grad.div_(pg.dp_size)


def _check_grads(chunks, pg, r, cfg, tag):
    from megatron_ascend.models.deepseek.hf_names import hf_tensor_for
    from megatron_ascend.tensor_parallel import gather_full
    n = 0
    floor = GRAD_FLOOR * max(v.abs().max().item() for v in r["grads"].values())
    for c in chunks:
        for name, p in c.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            full = gather_full(g, p, pg) if pg is not None else g
            if ".indexer." in name:  # transformers' indexer is not trained by the LM loss (no KL loss here)
                assert full.abs().max().item() == 0.0, f"{tag}: indexer param {name} got an LM gradient"
                continue
            want = hf_tensor_for(name, r["grads"].get, cfg)
            assert want.abs().max().item() > 0 or ".gate." in name, f"{tag}: {name} has a zero reference grad"
            assert_rel(full, want, GRAD_TOL, f"{tag}: grad of {name}", floor=floor)
            n += 1
    return n


def _logits_full(logits, pg, V):
    from megatron_ascend.tensor_parallel import mappings as M
    full = M._gather_dim(logits.detach(), -1, pg.tp if pg is not None else None)
    return full[..., :V].transpose(0, 1)


def _one_chunk(cfg, par, pg, r, tag):
    """No pipeline: the whole model on every rank of the layout."""
    m = _build(cfg, par, pg, r["sd"])
    ids, labels, mask = r["ids"], r["labels"], r["mask"]
    out = m(ids, labels=labels, loss_mask=mask)
    total = ((out["lm_loss"] * mask).sum() + out["mtp_loss_scale"] * out["mtp_losses"][0].sum()) / mask.sum()
    total.backward()
    with torch.no_grad():
        logits = m(ids)
    assert_rel(_logits_full(logits, pg, cfg.vocab_size), r["logits"], TOL, f"{tag}: logits")
    assert_rel(out["lm_loss"].detach(), r["tok"], TOL, f"{tag}: per-token loss")
    assert_rel(((out["lm_loss"] * mask).sum() / mask.sum()).detach(), r["loss"], TOL, f"{tag}: loss")
    assert_rel(out["mtp_losses"][0].detach(), r["mtp_tok"], TOL, f"{tag}: MTP per-token loss")
    assert_rel(total.detach(), r["total"], TOL, f"{tag}: loss with MTP")
    _finish_grads([m], pg)
    return _check_grads([m], pg, r, cfg, tag)


def _pipeline(cfg, par, pg, r, tag):
    """The model split over pipeline stages, run by the 1F1B schedule on one micro-batch."""
    from megatron_ascend.pipeline_parallel import (allreduce_embedding_grads, get_forward_backward_func,
                                                   model_chunk_specs, sync_embedding_weights)
    ids, labels, mask = r["ids"], r["labels"], r["mask"]
    chunks = [_build(cfg, par, pg, r["sd"], s.pre_process, s.post_process, s.layer_ids)
              for s in model_chunk_specs(cfg.num_hidden_layers, par.pp, pg.pp_rank, 1,
                                         par.decoder_first_pipeline_num_layers)]
    sync_embedding_weights(chunks, pg)
    fb = get_forward_backward_func(par.pp, 1)

    def train_step(it, chunk):
        next(it)
        out = chunk(ids, labels=labels, loss_mask=mask)

        def loss_func(o):
            lm = (o["lm_loss"] * mask).sum()
            mtp = o["mtp_losses"][0].sum()
            return lm + o["mtp_loss_scale"] * mtp, mask.sum(), {"tok": o["lm_loss"], "mtp": o["mtp_losses"][0]}
        return out, loss_func

    def logits_step(it, chunk):
        next(it)
        out = chunk(ids)
        return out, lambda o: (o.float().sum() * 0, mask.sum(), {"logits": _logits_full(o, pg, cfg.vocab_size)})

    logs = fb(train_step, iter([0]), chunks, 1, pg, num_tokens=mask.sum())
    with torch.no_grad():
        lg = fb(logits_step, iter([0]), chunks, 1, pg, forward_only=True, num_tokens=mask.sum())
    if pg.is_last_stage:
        assert_rel(lg[0]["logits"], r["logits"], TOL, f"{tag}: logits")
        assert_rel(logs[0]["tok"], r["tok"], TOL, f"{tag}: per-token loss")
        assert_rel(logs[0]["mtp"], r["mtp_tok"], TOL, f"{tag}: MTP per-token loss")
    _finish_grads(chunks, pg)
    allreduce_embedding_grads(chunks, pg)
    return _check_grads(chunks, pg, r, cfg, tag)


def _body(refs, layouts):
    import torch.distributed as dist
    from megatron_ascend.config import ParallelConfig
    from megatron_ascend.moe import set_aux_loss_scale
    cfg, _, blob = refs
    r = R.unpack(blob)
    set_aux_loss_scale(1.0)
    out = []
    for kw in layouts:
        par = ParallelConfig(world_size=dist.get_world_size() if dist.is_initialized() else 1, **kw)
        pg = _groups(par)
        tag = " ".join(f"{k}={v}" for k, v in kw.items()) or "single process"
        fn = _pipeline if par.pp > 1 else _one_chunk
        out.append((tag, fn(cfg, par, pg, r, tag)))
    return out


def test_v4_single_process_equals_transformers():
    counts = _body(ref(), [{}])
    assert counts[0][1] > 100, counts


def test_v4_tp2_sp_ep2_pp2_equal_transformers():
    layouts = [dict(tensor_model_parallel_size=2), dict(tensor_model_parallel_size=2, sequence_parallel=True),
               dict(expert_model_parallel_size=2),
               dict(pipeline_model_parallel_size=2, decoder_first_pipeline_num_layers=2)]
    res = run_distributed(2, _body, ref(), layouts, timeout=900)
    assert all(n > 50 for rank in res for _, n in rank), res


def test_v4_tp2_pp2_ep2_sp_on_8_ranks_equal_transformers():
    layouts = [dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, expert_model_parallel_size=2,
                    sequence_parallel=True, decoder_first_pipeline_num_layers=3)]
    res = run_distributed(8, _body, ref(), layouts, timeout=900)
    assert all(n > 20 for rank in res for _, n in rank), res


def test_tiny_config_exercises_window_topk_and_compressed_entries():
    """Each feature the parity above relies on changes the reference's logits when it is widened."""
    base = _logits_of()
    for what, over in (("sliding window", dict(sliding_window=40)), ("CSA top-k", dict(index_topk=10)),
                       ("HCA entries", dict(compress_rates={R.CSA: 4, R.HCA: 64}))):
        d = (_logits_of(**over) - base).abs().max().item()
        assert d > 1e-3, f"widening the {what} changes the logits by only {d}"


def _logits_of(**over):
    _, hf = R.build_hf(0, **over)
    ids, _, _ = R.data(hf.config.vocab_size)
    with torch.no_grad():
        return hf(input_ids=ids).logits
