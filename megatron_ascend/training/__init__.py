"""The training loop and its entry points: ``python -m megatron_ascend.pretrain`` / ``posttrain``.

Module map:
  trainer   Trainer: build groups, model chunks, optimizer, data; train / evaluate / save / resume / exit
  step      forward_step_func, loss function, logged-loss reduction over dp and pp
  data      dataset sizes per split, mock / GPT / SFT datasets, resumable iterators
  parts     the one place the loop calls models/, pipeline_parallel/, distributed/, optimizer/, moe/, checkpointing/
  signals   SIGTERM -> save and exit
  entry     run(argv, stage) and the CLI wrapper shared by pretrain.py and posttrain.py
  generate  greedy decoding with the model's forward (single process) and exact-match evaluation for SFT

Nothing imports training/.
"""
