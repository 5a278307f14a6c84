"""Greedy decoding with the model's own forward, and held-out exact-match accuracy for SFT checks.

    python -m megatron_ascend.training.generate --load CKPT_DIR --tokenizer-type SentencePieceTokenizer \
        --tokenizer-model tok.model --eval-data test.jsonl [--max-new-tokens 16] [--prompt-type deepseek]

Runs in ONE process at TP1 / PP1 / EP1: the checkpoint (saved at any layout) is resharded on load by
checkpointing.load_checkpoint, and the model config comes from the checkpoint itself. Decoding is plain greedy
without a KV cache (the whole prefix is re-run for every new token: fine for the short answers of a check,
not an inference engine). Prompts of equal length are decoded as one batch.

``--eval-data`` is SFT JSONL (alpaca / sharegpt / messages, as tools/preprocess_data.py --sft reads it): the
prompt is the conversation up to its last assistant turn rendered with the chat template and the generation
prompt; the reference is that last assistant turn. Exact match compares the stripped decoded text with the
stripped reference. Prints ``exact match: K / N = ACC`` and writes a JSON summary with --output.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch


def load_single_process_model(load_dir: str):
    """(model, ModelConfig) at TP1 PP1 from a checkpoint directory saved at any layout."""
    from .. import parallel_state, platform
    from ..checkpointing import find_checkpoint, load_checkpoint, read_common
    from ..config import ConfigError, ModelConfig, ParallelConfig
    from ..models import build_model
    path, _ = find_checkpoint(load_dir, verify="size")  # load_checkpoint verifies the checksums
    if path is None:
        raise ConfigError(f"--load {load_dir!r} holds no checkpoint; pass the --save directory of a training run")
    common = read_common(path)
    if not common.get("model_config"):
        raise ConfigError(f"checkpoint {path} does not record its model config; it was not written by the trainer")
    cfg = ModelConfig(**common["model_config"])
    platform.init_distributed()
    groups = parallel_state.initialize_model_parallel(ParallelConfig(world_size=1))
    model = build_model(cfg, ParallelConfig(world_size=1), groups, padded_vocab_size=cfg.vocab_size)
    load_checkpoint(load_dir, [model], None, None, groups, finetune=True, no_load_optim=True, no_load_rng=True)
    model.to(platform.get_platform().device()).eval()
    return model, cfg


@torch.no_grad()
def greedy_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos: int,
                    vocab_size: Optional[int] = None) -> List[List[int]]:
    """Greedy continuation of each prompt (stops at ``eos``, which is not returned). Logits of ids at or
    above ``vocab_size`` (vocab padding) are never chosen."""
    device = next(model.parameters()).device
    by_len: Dict[int, List[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    out: List[List[int]] = [[] for _ in prompts]
    for _, idx in sorted(by_len.items()):
        seqs = torch.tensor([list(prompts[i]) for i in idx], dtype=torch.long, device=device)
        done = torch.zeros(len(idx), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            logits = model(seqs)  # [s, b, V] at TP1
            last = logits[-1].float()
            if vocab_size is not None and vocab_size < last.shape[-1]:
                last[:, vocab_size:] = float("-inf")
            nxt = last.argmax(-1)
            for j, t in enumerate(nxt.tolist()):
                if not done[j]:
                    if t == eos:
                        done[j] = True
                    else:
                        out[idx[j]].append(t)
            if bool(done.all()):
                break
            seqs = torch.cat([seqs, nxt.unsqueeze(1)], dim=1)
    return out


def prompts_and_answers(path: str, tokenizer, prompt_type: Optional[str] = None
                        ) -> Tuple[List[List[int]], List[str], List[str]]:
    from ..data.sft_format import record_to_messages
    prompts, answers, texts = [], [], []
    with open(path) as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            msgs = record_to_messages(json.loads(line), where=f"{path}:{n + 1}")
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            prompts.append(tokenizer.apply_chat_template(msgs[:last], add_generation_prompt=True,
                                                         template=prompt_type))
            answers.append(msgs[last]["content"])
            texts.append(msgs[last - 1]["content"] if last else "")
    return prompts, answers, texts


def exact_match(model, tokenizer, path: str, max_new_tokens: int = 16, prompt_type: Optional[str] = None,
                limit: Optional[int] = None) -> Dict[str, object]:
    prompts, answers, texts = prompts_and_answers(path, tokenizer, prompt_type)
    if limit:
        prompts, answers, texts = prompts[:limit], answers[:limit], texts[:limit]
    gen = greedy_generate(model, prompts, max_new_tokens, tokenizer.eod, tokenizer.vocab_size)
    preds = [tokenizer.detokenize(g).strip() for g in gen]
    hits = sum(p == a.strip() for p, a in zip(preds, answers))
    return {"correct": hits, "total": len(answers), "accuracy": hits / max(len(answers), 1),
            "examples": [{"prompt": t, "reference": a, "prediction": p}
                         for t, a, p in list(zip(texts, answers, preds))[:8]]}


def main(argv=None) -> int:
    from ..config import ConfigError
    from ..data.errors import DataError
    from ..data.tokenizer import build_tokenizer
    p = argparse.ArgumentParser(prog="python -m megatron_ascend.training.generate",
                                description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="checkpoint directory (any training layout)")
    p.add_argument("--tokenizer-type", required=True)
    p.add_argument("--tokenizer-model", required=True)
    p.add_argument("--eval-data", required=True, help="SFT JSONL with reference answers")
    p.add_argument("--prompt-type", default=None, help="chat template (default: the tokenizer's, else deepseek)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
    p.add_argument("--output", default=None, help="write the summary as JSON here")
    p.add_argument("--label", default="", help="printed before the figure (e.g. 'before SFT')")
    args = p.parse_args(argv)
    try:
        tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
        model, _ = load_single_process_model(args.load)
        res = exact_match(model, tok, args.eval_data, args.max_new_tokens, args.prompt_type, args.limit)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    label = f"{args.label}: " if args.label else ""
    print(f"{label}exact match: {res['correct']} / {res['total']} = {res['accuracy']:.3f}")
    for ex in res["examples"][:4]:
        print(f"  {ex['prompt']!r} -> {ex['prediction']!r} (reference {ex['reference']!r})")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
