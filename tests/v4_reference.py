"""DeepSeek-V4 test helpers: tiny transformers configs and random models, and the reference computation
(transformers' DeepseekV4ForCausalLM plus one MTP depth built from transformers' pieces as DeepSeek's MTPBlock).
Workers never import transformers: the parent computes the reference once and passes it as bytes."""
from __future__ import annotations

import io

import torch
import torch.nn.functional as F

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"


def tiny_kwargs(**over):
    """5 layers mixing sliding / CSA / HCA and hash / score routing; with S = 40 tokens the window (6), the CSA
    top-k (3 of up to 10 entries) and several HCA entries (ratio 8) all matter."""
    d = dict(vocab_size=96, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=5, num_attention_heads=4,
             head_dim=16, partial_rotary_factor=0.5, q_lora_rank=16, o_groups=2, o_lora_rank=8,
             n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, routed_scaling_factor=1.5,
             index_n_heads=2, index_head_dim=16, index_topk=3, sliding_window=6,
             layer_types=[SLIDING, CSA, HCA, CSA, HCA], compress_rates={CSA: 4, HCA: 8},
             mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe", "moe"], swiglu_limit=1.0,
             max_position_embeddings=64, rope_theta=10000.0, compress_rope_theta=40000.0,
             rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                              "beta_fast": 32, "beta_slow": 1},
             hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6, num_nextn_predict_layers=1,
             tie_word_embeddings=False)
    d.update(over)
    return d


def hf_config(**over):
    import transformers
    cfg = transformers.DeepseekV4Config(**tiny_kwargs(**over))
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    return cfg


@torch.no_grad()
def randomize(m, seed=0):
    """Fan-in scaled weights (so every score, window and top-k choice matters), perturbed 1-D params (norms,
    sinks, mHC base / scale), random router biases and distinct-expert hash tables."""
    g = torch.Generator().manual_seed(seed)
    for n, p in m.named_parameters():
        r = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if p.dim() == 1:  # transformers' init (norms and mHC scales 1, biases and sinks 0) plus noise
            leaf = n.rsplit(".", 1)[-1]
            p.fill_(1.0 if leaf in ("weight", "scale", "hc_scale") else 0.0).add_(0.1 * r)
        elif "embed_tokens" in n:
            p.copy_(0.5 * r)
        else:
            p.copy_(r * p.shape[-1] ** -0.5)
    for n, b in m.named_buffers():
        if n.endswith("e_score_correction_bias"):
            b.copy_(0.05 * torch.randn(b.shape, generator=g))
        elif n.endswith("tid2eid"):
            e = m.config.n_routed_experts
            b.copy_(torch.rand(b.shape[0], e, generator=g).topk(b.shape[1], dim=-1).indices)


def build_hf(seed=0, **over):
    import transformers
    cfg = hf_config(**over)
    torch.manual_seed(seed)
    m = transformers.DeepseekV4ForCausalLM(cfg).float()
    randomize(m, seed)
    return cfg, m


def data(vocab, b=2, s=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    labels = torch.randint(0, vocab, (b, s), generator=g)
    mask = (torch.rand(b, s, generator=g) > 0.25).float()
    return ids, labels, mask


def shift_left(t, k, fill):
    out = torch.full_like(t, fill)
    out[:, : t.shape[1] - k] = t[:, k:]
    return out


def _mtp_block_class():
    import torch.nn as nn
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import (DeepseekV4DecoderLayer, DeepseekV4HyperHead,
                                                                      DeepseekV4RMSNorm)

    class RefMTPBlock(DeepseekV4DecoderLayer):
        """DeepSeek's V4 MTPBlock from transformers' pieces: a decoder layer (sliding attention) + e_proj / h_proj /
        enorm / hnorm / norm / hc_head (the names of our HF export, ``mtp.{k}.*``)."""

        def __init__(self, cfg, layer_idx):
            super().__init__(cfg, layer_idx)
            h = cfg.hidden_size
            self.e_proj = nn.Linear(h, h, bias=False)
            self.h_proj = nn.Linear(h, h, bias=False)
            self.enorm = DeepseekV4RMSNorm(h, cfg.rms_norm_eps)
            self.hnorm = DeepseekV4RMSNorm(h, cfg.rms_norm_eps)
            self.norm = DeepseekV4RMSNorm(h, cfg.rms_norm_eps)
            self.hc_head = DeepseekV4HyperHead(cfg)

        def mtp(self, emb, streams, **kw):
            x = self.e_proj(self.enorm(emb)).unsqueeze(2) + self.h_proj(self.hnorm(streams))
            x = DeepseekV4DecoderLayer.forward(self, x, **kw)
            return x, self.norm(self.hc_head(x))

    return RefMTPBlock


def reference(seed=0, b=2, s=40, mtp_scale=0.3, **over):
    """transformers' logits / per-token loss / loss and every parameter gradient on tiny random data, plus one MTP
    depth built from transformers' pieces on the main model's final streams (DeepSeek's MTPBlock), packed to
    bytes for the forkserver workers. The gradients are those of ``(sum(lm * mask) + mtp_scale *
    sum(mtp * mask_1)) / sum(mask)`` (the trainer's loss); ``grads_lm`` those of the LM loss alone."""
    import copy as _copy
    from megatron_ascend.models.deepseek import model_config_for_hf
    cfg_hf, hf = build_hf(seed, **over)
    V, L = cfg_hf.vocab_size, cfg_hf.num_hidden_layers
    ids, labels, mask = data(V, b, s)
    # main model, streams before the head's collapse captured
    captured = {}
    hook = hf.model.hc_head.register_forward_pre_hook(lambda mod, args: captured.__setitem__("streams", args[0]))
    logits = hf(input_ids=ids).logits
    hook.remove()
    tok = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none").view(b, s)
    ntok = mask.sum()
    loss = (tok * mask).sum() / ntok
    loss.backward(retain_graph=True)
    grads_lm = {n: p.grad.detach().clone() for n, p in hf.named_parameters() if p.grad is not None}
    hf.zero_grad(set_to_none=True)
    # MTP depth 1 (sliding attention, global layer index L)
    mcfg = _copy.deepcopy(cfg_hf)
    mcfg.layer_types = list(cfg_hf.layer_types) + [SLIDING]
    mcfg.mlp_layer_types = list(cfg_hf.mlp_layer_types) + ["moe"]
    mtp = _mtp_block_class()(mcfg, L).float()
    randomize_module(mtp, seed + 7, n_experts=cfg_hf.n_routed_experts)
    ids1, labels1, mask1 = shift_left(ids, 1, 0), shift_left(labels, 1, 0), shift_left(mask, 1, 0.0)
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    emb = hf.model.embed_tokens(ids1)
    pe = {k: hf.model.rotary_emb(emb, pos, layer_type=k) for k in ("main", "compress")}
    amask = sliding_mask(s, cfg_hf.sliding_window, emb.dtype).expand(b, 1, s, s)
    _, head_in = mtp.mtp(emb, captured["streams"], input_ids=ids1, position_embeddings=pe, position_ids=pos,
                         attention_mask=amask)
    mtp_tok = F.cross_entropy(hf.lm_head(head_in).reshape(-1, V), labels1.reshape(-1), reduction="none").view(b, s)
    total = ((tok * mask).sum() + mtp_scale * (mtp_tok * mask1).sum()) / ntok
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in hf.named_parameters() if p.grad is not None}
    grads.update({f"mtp.0.{n}": p.grad.detach().clone() for n, p in mtp.named_parameters() if p.grad is not None})
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    sd.update({f"mtp.0.{k}": v.detach().clone() for k, v in mtp.state_dict().items()})
    ref = dict(sd=sd, ids=ids, labels=labels, mask=mask, logits=logits.detach(), tok=tok.detach(),
               loss=loss.detach(), mtp_tok=(mtp_tok * mask1).detach(), total=total.detach(), grads=grads,
               grads_lm=grads_lm)
    buf = io.BytesIO()
    torch.save(ref, buf)
    cfg = model_config_for_hf(cfg_hf, aux_loss_alpha=0.0, mtp_loss_scaling_factor=mtp_scale)
    return cfg, cfg_hf.to_dict(), buf.getvalue()


@torch.no_grad()
def randomize_module(m, seed, n_experts):
    """randomize() for a module without a config attribute."""
    class _Cfg:
        pass
    had = hasattr(m, "config")
    if not had:
        m.config = _Cfg()
        m.config.n_routed_experts = n_experts
    randomize(m, seed)
    if not had:
        del m.config


def unpack(blob):
    return torch.load(io.BytesIO(blob), weights_only=True)


def sliding_mask(s, window, dtype, device=None):
    i = torch.arange(s, device=device)
    ok = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
    return torch.zeros(s, s, dtype=dtype, device=device).masked_fill(~ok, float("-inf"))
