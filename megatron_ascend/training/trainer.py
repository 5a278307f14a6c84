"""The training loop shared by pretraining and post-training (SFT).

``Trainer(args, stage)`` builds, in order: distributed init (platform.init_distributed, unless already
initialised), process groups, RNG seeds, tokenizer, model chunks (one model per virtual pipeline stage of this
rank, built by ``models.build_model`` from the config's model_type -- DeepSeek V2 / V3 / V3.2 / V4 -- each wrapped
in DistributedDataParallel), optimizer + LR scheduler, checkpoint load
(--load), datasets and iterators, TensorBoard writer and logger. ``train()`` runs until --train-iters, with

* evaluation every --eval-interval (``lm loss validation`` and its ppl, forward-only over --eval-iters batches);
* a checkpoint every --save-interval, at the end, and when exiting for --exit-interval,
  --exit-duration-in-mins, --exit-at-loss (training/loss_target.py) or SIGTERM (all ranks agree on the exit
  decision before saving);
* after each successful optimizer step: scheduler step and moe.update_expert_bias (aux-loss-free balancing).

Exact resume: the checkpoint holds model, optimizer, scheduler, RNG (checkpointing package) and, in
``extra_state``, the iteration and consumed train samples; the train iterator restarts at that sample.

Every rank records run metadata and per-rank step statistics (monitoring/run_metadata.py: ``run_metadata.json``
and ``rank_stats.jsonl`` in --tensorboard-dir, else --save).

Returns a ``TrainResult`` (per-iteration losses and validation results) so tests and tools can inspect a run
in-process.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from .. import parallel_state, platform
from ..arguments import build_configs
from ..config import ConfigError, num_microbatches, padded_vocab_size
from ..monitoring import TensorBoardWriter, Throughput, TrainingLogger
from ..monitoring.flops import model_flops_per_token
from ..monitoring.run_metadata import RunRecorder
from ..monitoring.throughput import resolve_peak_tflops
from ..placement import placement_of
from . import parts, preflight
from .loss_target import LossTarget
from .data import build_datasets, train_iterator, valid_iterator
from .faults import FaultInjector
from .health import NanGuard, TrainingHalted
from .watchdog import Watchdog
from .signals import ExitSignalHandler
from .step import ForwardStep, global_token_count, prefetch, reduce_logged_losses


@dataclass
class TrainResult:
    iteration: int = 0
    consumed_samples: int = 0
    losses: Dict[int, Dict[str, float]] = field(default_factory=dict)  # iteration -> reduced losses
    grad_norms: Dict[int, Optional[float]] = field(default_factory=dict)
    validation: Dict[int, Dict[str, float]] = field(default_factory=dict)
    exit_reason: str = ""
    saved: List[int] = field(default_factory=list)
    nan_events: List = field(default_factory=list)  # training/health.py NanEvent per NaN / Inf step
    loss_spikes: List = field(default_factory=list)


def _print_rank0(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


class Trainer:
    def __init__(self, args, stage: str = "pretrain", print_fn=None):
        self.args = args
        self.stage = stage
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        # validate every flag before touching the network, so a bad flag is one line on stderr
        self.model_cfg, self.par, self.opt_cfg, self.train_cfg, self.data_cfg = build_configs(args, world)
        self.loss_target = LossTarget.from_args(args)  # --exit-at-loss
        if self.train_cfg.train_iters <= 0:
            raise ConfigError("--train-iters is not set (or 0); give the number of iterations to train")
        if self.model_cfg.model_type == "deepseek_v4":
            packed = [f for f, on in (("--sft-packing", getattr(args, "sft_packing", False)),
                                      ("--reset-attention-mask", self.data_cfg.reset_attention_mask),
                                      ("--reset-position-ids", self.data_cfg.reset_position_ids)) if on]
            if packed:
                raise ConfigError(f"deepseek_v4 trains on one sequence per sample: {' '.join(packed)} would pack "
                                  f"documents whose sliding window and compressed entries (absolute positions) cross "
                                  f"each other; drop {' / '.join(packed)}")
        self.tokenizer = None
        self._resolve_vocab()
        # before any work: paths writable / present, data files, the LR schedule's rules
        preflight.check_paths(self.train_cfg)
        preflight.check_data(self.data_cfg, sft=(stage == "sft"))
        preflight.check_schedule(self.opt_cfg, self.train_cfg)
        # device / HCCL flags and --deterministic (platform/runtime.py), applied before any communicator exists
        self.runtime = platform.RuntimeOptions.from_args(args)
        platform.kernels.configure_from_args(args)
        self.plat = platform.init_distributed(options=self.runtime)
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        # the one placement: chunks, embedding group, loss source and logging rank all derive from it
        self.placement = placement_of(self.model_cfg, self.par)
        self.groups = parallel_state.initialize_model_parallel(
            self.par, embedding_pp_ranks=self.placement.embedding_pp_ranks)
        self.device = self.plat.device()
        self.gbs = self.train_cfg.global_batch_size or self.train_cfg.micro_batch_size * self.par.dp
        self.num_micro = num_microbatches(self.train_cfg, self.par)
        self.vp = self.placement.vp
        self.holds_loss = self.groups.pp_rank == self.placement.loss_pp_rank
        self.loss_src = self.groups.ranks["pp"][self.placement.loss_pp_rank]
        parts.seed_everything(self.train_cfg.seed, self.groups)
        self.model_chunks = parts.build_model_chunks(self.model_cfg, self.par, self.opt_cfg, self.train_cfg,
                                                     self.groups, self.placement)
        self.optimizer, self.scheduler = parts.build_optimizer(self.model_chunks, self.opt_cfg, self.train_cfg,
                                                               self.par, self.groups)
        self.faults = FaultInjector(self.rank)  # MEGATRON_ASCEND_FAULT (tests, bench/fault_injection.py)
        self.faults.attach(self.model_chunks)
        self.faults.install_checkpoint_hook()
        t = self.train_cfg
        self.health = NanGuard(t.check_for_nan_in_loss_and_grad, t.nan_policy, t.nan_max_consecutive,
                               t.nan_trace_modules, t.loss_spike_factor, t.loss_spike_window, fp16=self.opt_cfg.fp16,
                               model_chunks=self.model_chunks, print_fn=_print_rank0)
        self._last_results = None
        wd = t.watchdog_timeout_minutes
        self.watchdog = Watchdog(wd * 60.0 if wd else None, self.rank, self.world, self.groups)
        self.forward_backward = parts.get_forward_backward_func(self.par.pp, self.vp,
                                                                self.par.microbatch_group_size_per_vp_stage)
        self._moe_scalars: Dict[str, float] = {}
        self.iteration = 0
        self.consumed_train_samples = 0
        self._loaded_iteration = None
        self._load()
        self._last_good = (self.iteration, self.consumed_train_samples)
        self.datasets = build_datasets(self.data_cfg, self.train_cfg, self.gbs, self.model_cfg.vocab_size,
                                       self.tokenizer, sft=(stage == "sft"),
                                       pack=bool(getattr(args, "sft_packing", False)))
        # a job restarted after its last iteration (killed while exiting) has nothing left to read or do
        self.train_iter = train_iterator(self.datasets.train, self.consumed_train_samples,
                                         self.train_cfg.micro_batch_size, self.groups.dp_rank, self.par.dp,
                                         self.gbs, self.data_cfg.num_workers) \
            if self.iteration < self.train_cfg.train_iters else iter(())
        self.is_logging_rank = self.rank == parts.logging_rank(self.par, self.placement)
        self.writer = TensorBoardWriter(self.train_cfg.tensorboard_dir, enabled=self.is_logging_rank)
        peak = resolve_peak_tflops(self.train_cfg.peak_tflops)
        self.flops_per_token = model_flops_per_token(self.model_cfg, self.train_cfg.seq_length,
                                                     self.model_cfg.vocab_size)
        if print_fn is None:
            print_fn = (lambda s: print(s, flush=True)) if self.is_logging_rank else None
        self.logger = TrainingLogger(self.writer, self.train_cfg.train_iters, self.train_cfg.log_interval,
                                     Throughput(self.flops_per_token, self.world, peak), print_fn)
        self.signal = ExitSignalHandler()
        self.profiler = platform.profiler.step_profiler(self.runtime.profile, self.rank)
        self.result = TrainResult()
        for line in platform.startup_lines():  # environment set, flags without effect here, kernels in use
            _print_rank0(line)
        if self.is_logging_rank and self.writer.enabled:
            self.writer.text("config", f"stage {stage} prompt-type {getattr(args, 'prompt_type', None)}\n"
                                       f"model {dataclasses.asdict(self.model_cfg)}\nparallel {self.par}")
        self.recorder = RunRecorder.for_trainer(self, peak)  # run_metadata.json + rank_stats.jsonl

    # -- setup helpers ---------------------------------------------------------------------------------
    def _resolve_vocab(self) -> None:
        """Tokenizer -> padded vocab size (Megatron's rule) unless --vocab-size was given explicitly."""
        d = self.data_cfg
        tp = self.par.tp
        if d.tokenizer_type:
            from ..data.tokenizer import build_tokenizer
            self.tokenizer = build_tokenizer(d.tokenizer_type, d.tokenizer_model, d.make_vocab_size_divisible_by,
                                             tp, vocab_size=self.args.vocab_size)
            vocab = self.tokenizer.padded_vocab_size
            if self.args.vocab_size is not None and self.args.vocab_size < self.tokenizer.vocab_size:
                raise ConfigError(f"--vocab-size {self.args.vocab_size} is below the tokenizer's vocabulary "
                                  f"{self.tokenizer.vocab_size}; drop --vocab-size or raise it")
            if self.args.vocab_size is not None:
                vocab = self.args.vocab_size
        else:
            vocab = self.model_cfg.vocab_size
        if vocab % tp:
            vocab = padded_vocab_size(vocab, d.make_vocab_size_divisible_by, tp)
        if vocab != self.model_cfg.vocab_size:
            self.model_cfg = dataclasses.replace(self.model_cfg, vocab_size=vocab)

    def _load(self) -> None:
        t = self.train_cfg
        if not t.load:
            return
        same = bool(t.save) and os.path.abspath(t.save) == os.path.abspath(t.load)
        if not parts.checkpoint_exists(t.load, partial_ok=same):
            if t.finetune or self.stage == "sft":
                raise ConfigError(f"--load {t.load!r} holds no checkpoint; --finetune / SFT needs the pretrained "
                                  f"checkpoint directory (the --save of the pretraining run)")
            _print_rank0(f"no checkpoint under --load {t.load}; starting from scratch")
            return
        iteration, extra = parts.load_checkpoint(t.load, self.model_chunks, self.optimizer, self.scheduler,
                                                 self.groups, t)
        if t.finetune:
            self.iteration, self.consumed_train_samples = 0, 0
        else:
            self.iteration = self._loaded_iteration = int(iteration)
            self.consumed_train_samples = int((extra or {}).get("consumed_train_samples", self.iteration * self.gbs))
        _print_rank0(f"loaded checkpoint from {t.load} at iteration {iteration}"
                     + (" (finetune: iteration and optimizer reset)" if t.finetune else ""))

    # -- one step ----------------------------------------------------------------------------------------
    def train_step(self):
        batches = prefetch(self.train_iter, self.num_micro, self.device)
        tokens = global_token_count(batches, self.groups.loss)
        fwd = ForwardStep(parts.mtp_scale(self.model_cfg), parts.call_model)
        for c in self.model_chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss_scale = parts.loss_scale(self.optimizer) or 1.0  # fp16: LM and aux losses alike
        parts.set_aux_loss_scale(self.num_micro, self.groups, loss_scale)
        results = self.forward_backward(fwd, iter(batches), self.model_chunks, self.num_micro, self.groups,
                                        forward_only=False, num_tokens=tokens, loss_scale=loss_scale)
        parts.finalize_grads(self.model_chunks, self.groups)
        self._last_results = results  # this rank's per-micro-batch loss sums (the NaN report reads them)
        ok, grad_norm, num_zeros = self.optimizer.step()
        if ok:
            self.scheduler.step(1)
            parts.update_expert_bias(self.model_chunks, self.groups, self.opt_cfg.moe_router_bias_update_rate)
        losses = reduce_logged_losses(results, tokens, self.groups.loss, self.groups.pp, self.holds_loss,
                                      self.loss_src)
        moe = parts.moe_log_values(parts.moe_stats(self.model_chunks, self.groups), self.model_cfg.num_moe_layers)
        losses.update(moe["losses"])
        self._moe_scalars = moe["scalars"]
        return losses, ok, grad_norm, num_zeros, float(tokens)

    @torch.no_grad()
    def evaluate(self, dataset=None, iters: Optional[int] = None) -> Dict[str, float]:
        dataset = dataset if dataset is not None else self.datasets.valid
        iters = self.train_cfg.eval_iters if iters is None else iters
        if dataset is None or iters <= 0:
            return {}
        for c in self.model_chunks:
            c.eval()
        it = valid_iterator(dataset, self.train_cfg.micro_batch_size, self.groups.dp_rank, self.par.dp, self.gbs)
        results = []
        total_tokens = 0.0
        for _ in range(iters):
            batches = prefetch(it, self.num_micro, self.device)
            total_tokens += float(global_token_count(batches, self.groups.loss))
            fwd = ForwardStep(parts.mtp_scale(self.model_cfg), parts.call_model)
            results += self.forward_backward(fwd, iter(batches), self.model_chunks, self.num_micro, self.groups,
                                             forward_only=True) or []
        out = reduce_logged_losses(results, total_tokens, self.groups.loss, self.groups.pp, self.holds_loss,
                                   self.loss_src)
        for c in self.model_chunks:
            c.train()
        parts.moe_stats(self.model_chunks, self.groups)  # drop the evaluation's routing statistics
        return out

    # -- checkpoint ------------------------------------------------------------------------------------------
    def save(self) -> None:
        t = self.train_cfg
        if not t.save:
            return
        if self.result.saved and self.result.saved[-1] == self.iteration:
            return
        if self.iteration == self._loaded_iteration:
            return  # the checkpoint this run resumed from holds exactly this state
        parts.save_checkpoint(t.save, self.iteration, self.model_chunks, self.optimizer, self.scheduler,
                              self.groups, {"consumed_train_samples": self.consumed_train_samples,
                                            "stage": self.stage, "global_batch_size": self.gbs},
                              save_retain=t.save_retain, save_optim=t.save_optim, save_rng=t.save_rng,
                              async_save=t.async_save)
        self.result.saved.append(self.iteration)
        _print_rank0(f"saved checkpoint at iteration {self.iteration:8d} to {t.save}")

    # -- the loop -----------------------------------------------------------------------------------------
    def _want_exit(self, start_time: float) -> str:
        t = self.train_cfg
        if t.exit_interval and self.iteration % t.exit_interval == 0:
            return f"exit-interval {t.exit_interval}"
        if t.exit_duration_in_mins:
            elapsed = torch.tensor([(time.time() - start_time) / 60.0], device=self.device)  # NCCL/HCCL: device
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # all ranks decide together
            if float(elapsed) > t.exit_duration_in_mins:
                return f"exit-duration-in-mins {t.exit_duration_in_mins}"
        if self.signal.received():
            return "SIGTERM"
        if self.loss_target.reached(self.device):
            return self.loss_target.reason()
        return ""

    def train(self) -> TrainResult:
        t = self.train_cfg
        self.signal.install()
        self.watchdog.start()
        start = time.time()
        _print_rank0(f"training {self.stage}: iterations {self.iteration} -> {t.train_iters}, global batch {self.gbs}, "
                     f"{self.num_micro} micro-batches of {t.micro_batch_size} per dp rank, layout tp {self.par.tp} "
                     f"pp {self.par.pp} (vp {self.vp}) ep {self.par.ep} dp {self.par.dp}, "
                     f"{self.flops_per_token / 1e9:.4f} GFLOP/token")
        try:
            while self.iteration < t.train_iters:
                platform.synchronize()
                self.watchdog.beat(self.iteration + 1)
                self.faults.step(self.iteration + 1)
                self.health.begin_step()
                t0 = time.perf_counter()
                self.profiler.before(self.iteration + 1)
                losses, ok, grad_norm, num_zeros, tokens = self.train_step()
                platform.synchronize()
                dt = time.perf_counter() - t0
                self.profiler.after(self.iteration + 1)
                if not self.result.losses and platform.kernels.declined():  # first iteration: fused kernels
                    _print_rank0(platform.kernels.declined_line())             # that fell back, and why
                self.iteration += 1
                self.consumed_train_samples += self.gbs
                gn = None if grad_norm is None else float(grad_norm)
                verdict = self.health.after_step(self.iteration, losses, gn, self._last_results, self.optimizer)
                if verdict == "ok" and ok:
                    self._last_good = (self.iteration, self.consumed_train_samples)
                self.result.losses[self.iteration] = losses
                self.result.grad_norms[self.iteration] = gn
                extra = self._moe_scalars
                self.logger.record_iteration(
                    self.iteration, self.consumed_train_samples, losses, self.scheduler_lr(), self.gbs, gn,
                    not ok, self.gbs * t.seq_length,
                    dt, None if num_zeros is None else float(num_zeros), parts.loss_scale(self.optimizer), extra)
                if verdict == "stop":
                    self._halt_on_nan()
                self.recorder.on_iteration(self.iteration, dt)
                self.loss_target.update(losses.get("lm loss"))
                if t.eval_interval and self.iteration % t.eval_interval == 0 and self.datasets.valid is not None:
                    self._run_eval()
                if t.save and t.save_interval and self.iteration % t.save_interval == 0:
                    self.save()
                reason = self._want_exit(start)
                if reason:
                    self.result.exit_reason = reason
                    _print_rank0(f"exiting at iteration {self.iteration} ({reason})")
                    self.save()
                    break
            else:
                self.result.exit_reason = "train-iters"
                if t.eval_interval and self.datasets.valid is not None and \
                        self.iteration % t.eval_interval != 0:
                    self._run_eval()
                self.save()
            self.recorder.finish()
        finally:
            self.watchdog.stop()
            self.profiler.close()
            self.signal.release()
            self.writer.flush()
            self.result.nan_events = list(self.health.events)
            self.result.loss_spikes = list(self.health.spikes)
            if t.async_save:
                parts.wait_for_checkpoint()  # --async-save: the last checkpoint is committed before we return
        self.result.iteration = self.iteration
        self.result.consumed_samples = self.consumed_train_samples
        return self.result

    def _halt_on_nan(self) -> None:
        """--nan-policy stop: the skipped steps left weights, optimizer and schedule as the last good step left
        them; save that state under the last good iteration (and its consumed samples) and stop."""
        it, consumed = self._last_good
        self.iteration, self.consumed_train_samples = it, consumed
        saved = "no --save given, nothing saved"
        if self.train_cfg.save:
            self.save()
            saved = f"the last good state (iteration {it}) saved to {self.train_cfg.save}"
        self.result.exit_reason = "nan"
        raise TrainingHalted(f"stopped after {self.health.consecutive} NaN/Inf step(s) in a row (--nan-policy stop, "
                             f"--nan-max-consecutive {self.train_cfg.nan_max_consecutive}); {saved}; see the NaN/Inf "
                             f"report above, rerun with --nan-trace-modules to name the first module, or use "
                             f"--nan-policy skip")

    def _run_eval(self) -> None:
        v = self.evaluate()
        if v:
            self.result.validation[self.iteration] = v
            self.logger.record_validation(self.iteration, self.consumed_train_samples, v)

    def scheduler_lr(self) -> float:
        return parts.current_lr(self.optimizer, self.scheduler)

    def close(self) -> None:
        self.faults.uninstall()
        self.health.close()
        self.writer.close()
