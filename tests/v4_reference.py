"""DeepSeek-V4 test helpers: tiny transformers configs and models, the reference computation, and a STAND-IN
attention used only until the library's own V4 attention (models/deepseek_v4/attention.py) is present.

The stand-in is transformers' own DeepseekV4Attention behind our interface
``(x [s(/tp), b, h], rope, position_ids [b, s]) -> (out [s(/tp), b, h], None)``: every TP rank runs the whole
attention on the whole sequence (under SP it all-gathers the sequence first and keeps its own slice, so its
weights get partial gradients and are marked ``sequence_parallel``). It lets the rest of V4 (mHC, MoE, layer,
model, MTP, pipeline, trainer) be tested against transformers before the attention exists.
"""
from __future__ import annotations

import contextlib
import copy
import io
from unittest import mock

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
        if p.dim() == 1:
            p.add_(0.1 * r)
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


def reference(seed=0, b=2, s=40, **over):
    """HF's logits / per-token loss / masked-mean loss / parameter grads on tiny random data, packed to bytes for
    the forkserver workers, with our ModelConfig and the HF config."""
    from megatron_ascend.models.deepseek import model_config_for_hf
    cfg_hf, hf = build_hf(seed, **over)
    V = cfg_hf.vocab_size
    ids, labels, mask = data(V, b, s)
    logits = hf(input_ids=ids).logits
    tok = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none").view(b, s)
    loss = (tok * mask).sum() / mask.sum()
    loss.backward()
    ref = dict(sd={k: v.detach().clone() for k, v in hf.state_dict().items()}, ids=ids, labels=labels, mask=mask,
               logits=logits.detach(), tok=tok.detach(), loss=loss.detach(),
               grads={n: p.grad.detach().clone() for n, p in hf.named_parameters() if p.grad is not None})
    buf = io.BytesIO()
    torch.save(ref, buf)
    return model_config_for_hf(cfg_hf, aux_loss_alpha=0.0), cfg_hf.to_dict(), buf.getvalue()


def unpack(blob):
    return torch.load(io.BytesIO(blob), weights_only=True)


# ---------------------------------------------------------------------------------------------- stand-in
def _hf_cfg_from_dict(d):
    import transformers
    d = {k: v for k, v in d.items() if k not in ("transformers_version", "architectures", "model_type")}
    cfg = transformers.DeepseekV4Config(**d)
    cfg._attn_implementation = "eager"
    return cfg


def sliding_mask(s, window, dtype, device=None):
    i = torch.arange(s, device=device)
    ok = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
    return torch.zeros(s, s, dtype=dtype, device=device).masked_fill(~ok, float("-inf"))


def _standin_class():
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Attention as HFAttention
    from megatron_ascend.tensor_parallel import mappings as M
    from megatron_ascend.tensor_parallel.sharding import mark_sharded

    class StandInAttention(HFAttention):
        def __init__(self, hf_cfg, config, parallel, groups, layer_idx):
            hf_cfg = copy.deepcopy(hf_cfg)
            n = len(hf_cfg.layer_types)
            if layer_idx >= n:  # an MTP layer: its kind from our config (sliding unless listed)
                hf_cfg.layer_types = list(hf_cfg.layer_types) + [config.attention_type(i)
                                                                 for i in range(n, layer_idx + 1)]
            super().__init__(hf_cfg, layer_idx)
            self.tp = parallel.tp
            self.sp = parallel.sequence_parallel and parallel.tp > 1
            self.group = groups.tp if groups is not None else None
            self.tp_rank = groups.tp_rank if groups is not None else 0
            for p in self.parameters():
                mark_sharded(p, None, sequence_parallel=self.sp)

        def forward(self, x, rope, position_ids):
            full = M.gather_from_sequence_parallel_region(x, self.group) if self.sp else x
            s = full.shape[0]
            mask = sliding_mask(s, self.sliding_window, full.dtype, full.device).expand(full.shape[1], 1, s, s)
            out, _ = super().forward(full.transpose(0, 1), rope, position_ids, mask)
            out = out.transpose(0, 1)
            if self.sp:
                n = s // self.tp
                out = out[self.tp_rank * n:(self.tp_rank + 1) * n]
            return out, None

    return StandInAttention


class StandInRope:
    def __init__(self, hf_cfg):
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding
        self.rot = DeepseekV4RotaryEmbedding(hf_cfg)

    def __call__(self, position_ids, device):
        x = torch.empty(0, dtype=torch.float32, device=device)
        return {k: self.rot(x, position_ids, layer_type=k) for k in ("main", "compress")}


@contextlib.contextmanager
def standin(hf_cfg_dict):
    """Build V4 models with transformers' attention and rotary tables behind our interface."""
    hf_cfg = _hf_cfg_from_dict(hf_cfg_dict)
    cls = _standin_class()
    with mock.patch("megatron_ascend.models.deepseek_v4.layer.build_attention",
                    lambda config, parallel, groups, i: cls(hf_cfg, config, parallel, groups, i)), \
            mock.patch("megatron_ascend.models.deepseek_v4.model.build_rope", lambda config: StandInRope(hf_cfg)):
        yield


def have_library_attention() -> bool:
    import importlib.util
    return importlib.util.find_spec("megatron_ascend.models.deepseek_v4.attention") is not None


@contextlib.contextmanager
def v4_attention(hf_cfg_dict):
    """The library's attention when it exists, else the stand-in."""
    if have_library_attention():
        yield
    else:
        with standin(hf_cfg_dict):
            yield
