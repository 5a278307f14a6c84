#!/usr/bin/env python
"""Side by side: one training step (forward + backward + AdamW) of our DeepseekV4ForCausalLM vs transformers'
DeepseekV4ForCausalLM on the same DeepSeek-V4 config, the same weights and the same thread count, in one process.

    python bench/v4_vs_transformers.py [--configs small,large] [--reps 6] [--threads 2]

The method is bench/vs_transformers.py's (its step functions are used): the two losses on the same batch must
agree first (|dloss| <= 1e-5, fp32); the steps are interleaved, warm-up repetitions discarded, and the median and
IQR of tokens/s printed with the ratio ours / transformers. Ours: DistributedDataParallel (flat grad buffer) +
megatron_ascend.optimizer (fused AdamW, clip inside ``step()``); transformers: ``clip_grad_norm_`` +
``torch.optim.AdamW(fused=True)``, eager attention (the only one V4 ships). ``--same-optimizer`` compares the
models alone (torch AdamW foreach on both, no clipping). The configs mix sliding / CSA / HCA layers and hash /
score-routed MoE, at sequence lengths where the window, the top-k and several compressed entries matter.
Not a test: CPU timings on a shared machine are noisy; read the IQR.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import vs_transformers as V  # noqa: E402

CSA, HCA = "compressed_sparse_attention", "heavily_compressed_attention"
LAYERS = dict(num_hidden_layers=4, layer_types=["sliding_attention", CSA, HCA, CSA],
              mlp_layer_types=["hash_moe", "moe", "moe", "moe"])
CONFIGS = {
    "small": dict(model=dict(vocab_size=1024, hidden_size=256, moe_intermediate_size=128, num_attention_heads=8,
                             head_dim=64, partial_rotary_factor=0.25, q_lora_rank=128, o_groups=4, o_lora_rank=64,
                             n_routed_experts=16, num_experts_per_tok=4, index_n_heads=4, index_head_dim=32,
                             index_topk=16, sliding_window=64, compress_rates={CSA: 4, HCA: 32}, **LAYERS),
                  seq=256, mbs=2),
    "large": dict(model=dict(vocab_size=4096, hidden_size=1024, moe_intermediate_size=256, num_attention_heads=16,
                             head_dim=128, partial_rotary_factor=0.25, q_lora_rank=256, o_groups=8, o_lora_rank=128,
                             n_routed_experts=32, num_experts_per_tok=4, index_n_heads=8, index_head_dim=64,
                             index_topk=32, sliding_window=128, compress_rates={CSA: 4, HCA: 64}, **LAYERS),
                  seq=512, mbs=1),
}


def build(name):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
    from megatron_ascend.models import build_model
    from megatron_ascend.models.deepseek import load_hf_state_dict_into, model_config_for_hf
    spec = CONFIGS[name]
    torch.manual_seed(0)
    hf_cfg = DeepseekV4Config(**spec["model"], num_nextn_predict_layers=0, max_position_embeddings=4096)
    hf_cfg._attn_implementation = "eager"
    hf = DeepseekV4ForCausalLM(hf_cfg).float()
    with torch.no_grad():  # a real hash table (transformers leaves it 0 for a checkpoint to fill)
        for n, b in hf.named_buffers():
            if n.endswith("tid2eid"):
                b.copy_(torch.rand(b.shape[0], hf_cfg.n_routed_experts).topk(b.shape[1], dim=-1).indices)
    cfg = model_config_for_hf(hf_cfg, aux_loss_alpha=0.0, num_nextn_predict_layers=0)
    ours = build_model(cfg)
    missing, unused = load_hf_state_dict_into(ours, hf.state_dict())
    if missing or unused:
        raise RuntimeError(f"weight transfer incomplete: missing {missing[:5]}, unused {unused[:5]}")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (spec["mbs"], spec["seq"]), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (spec["mbs"], spec["seq"]), generator=g)
    return cfg, ours, hf, ids, labels


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--configs", default="small,large")
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--same-optimizer", action="store_true",
                   help="torch.optim.AdamW(foreach) on both sides, no clipping (compares the models alone)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import transformers
    from megatron_ascend.platform import tune_host_allocator
    tuned = tune_host_allocator()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, host allocator kept warm "
          f"(platform.tune_host_allocator, both sides): {tuned}")
    V.build = build  # the same run(): loss check, interleaved timing, ratio
    for name in a.configs.split(","):
        V.run(name, a.reps, a.warmup, a.same_optimizer)


if __name__ == "__main__":
    main()
