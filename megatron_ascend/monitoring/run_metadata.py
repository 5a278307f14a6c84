"""Run metadata and per-rank step statistics, written by every training run into its output directory.

The output directory is ``--tensorboard-dir`` when given, else ``--save``; with neither, nothing is written
(one line says so). Two files (docs/REPRODUCING.md describes every field):

* ``run_metadata.json`` (schema ``SCHEMA``), written once at start by the logging rank (the last rank, the one
  that writes TensorBoard): hardware (device name, count, memory, nodes, interconnect as far as the platform
  tells), driver / CUDA / CANN, torch / torch_npu / MindSpeed versions, the library's version and git commit,
  the resolved configuration (every config dataclass and the parsed flags) and layout, which implementation each
  fused-kernel table entry resolves to (platform/kernels.py), the data files' SHA-256 and one data checksum, the
  seed, the recipe (``$MEGATRON_ASCEND_RECIPE``, set by bench/reference/run.sh) and the FLOPs/peak behind MFU.
  A restart of the same run keeps the earlier file as ``run_metadata.prev-<n>.json``. Data files not hashed
  before (the cache is keyed by path, size and mtime: monitoring/checksum.py) are hashed at start when they
  total at most ``$MEGATRON_ASCEND_HASH_SYNC_BYTES`` (default 2 GiB), else in a background thread that rewrites
  the file when done (the process waits for it at exit); ``MEGATRON_ASCEND_DATA_CHECKSUM=off`` skips hashing.
* ``rank_stats.jsonl``: one line per log interval (and one at the end), gathered from every rank with one
  all_gather: the iterations, each rank's step seconds, memory (allocated / max allocated / reserved bytes) and
  a *straggler probe* -- the TFLOP/s of one fixed GEMM timed on each rank (a slow or throttled device shows up
  there even though synchronous collectives make every rank's step time equal). The probe uses no RNG.

``RunRecorder.start(...)`` (``for_trainer(trainer, peak)``) is called once by the trainer on every rank (it
gathers each rank's device with one all_gather_object); ``on_iteration(iteration, seconds)`` after every step;
``finish()`` after the loop on the normal path (every rank, collective). Nothing is gathered on an error path,
so a crash on one rank cannot turn into a hang here.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from . import checksum
from .memory import memory_scalars

SCHEMA = "megatron_ascend.run_metadata/1"
METADATA_FILE = "run_metadata.json"
RANK_STATS_FILE = "rank_stats.jsonl"
RECIPE_ENV = "MEGATRON_ASCEND_RECIPE"
HASH_SYNC_ENV = "MEGATRON_ASCEND_HASH_SYNC_BYTES"
CHECKSUM_ENV = "MEGATRON_ASCEND_DATA_CHECKSUM"
PROBE_ENV = "MEGATRON_ASCEND_STRAGGLER_PROBE"


def output_dir(training) -> Optional[str]:
    """Where a run's metadata goes: --tensorboard-dir, else --save, else None."""
    return getattr(training, "tensorboard_dir", None) or getattr(training, "save", None) or None


def json_safe(obj: Any) -> Any:
    """Dataclasses, tuples, numpy / torch scalars, non-finite floats -> plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: json_safe(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return json_safe(obj.item())
        except Exception:
            pass
    return str(obj)


def library_info() -> Dict[str, Any]:
    """The package's version, where it was imported from, and (from a git checkout) commit, branch, dirty."""
    import megatron_ascend
    pkg = os.path.dirname(os.path.abspath(megatron_ascend.__file__))
    out: Dict[str, Any] = {"version": getattr(megatron_ascend, "__version__", None), "path": pkg,
                           "git_commit": None}

    def git(*a) -> Optional[str]:
        try:
            r = subprocess.run(["git", "-C", pkg, *a], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit:
        out["git_commit"] = commit
        out["git_branch"] = git("rev-parse", "--abbrev-ref", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
        out["git_dirty"] = bool(status) if status is not None else None
    return out


def kernel_table() -> Dict[str, Dict[str, Any]]:
    """name -> {"status": what kernels.table() says, "impl": module.qualname of what kernels.get(name) returns}.
    Tolerant of how platform/kernels.py grows: a table value that is a dict is merged in, a missing API is
    skipped."""
    try:
        from ..platform import kernels
    except Exception as e:  # pragma: no cover - the package always has it
        return {"error": {"status": f"platform.kernels not importable: {e}"}}
    table = {}
    try:
        table = dict(kernels.table()) if hasattr(kernels, "table") else {}
    except Exception as e:
        table = {}
        out_err = str(e)
    else:
        out_err = None
    names = sorted(set(table) | set(getattr(kernels, "_REFERENCE", {}) or {}))
    out: Dict[str, Dict[str, Any]] = {}
    for name in names:
        v = table.get(name)
        entry: Dict[str, Any] = dict(json_safe(v)) if isinstance(v, dict) else {"status": json_safe(v)}
        try:
            fn = kernels.get(name)
            mod = getattr(fn, "__module__", None) or type(fn).__module__
            qual = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__qualname__
            entry.setdefault("impl", f"{mod}.{qual}")
        except Exception as e:
            entry.setdefault("impl", f"unavailable: {e}")
        out[name] = entry
    if os.environ.get("MEGATRON_ASCEND_KERNELS"):
        out.setdefault("_env", {})["MEGATRON_ASCEND_KERNELS"] = os.environ["MEGATRON_ASCEND_KERNELS"]
    if out_err:
        out["_error"] = {"status": out_err}
    return out


def recipe_info() -> Optional[Dict[str, Any]]:
    """``$MEGATRON_ASCEND_RECIPE``: a JSON object (bench/reference/run.sh writes one) or a plain name."""
    raw = os.environ.get(RECIPE_ENV)
    if not raw:
        return None
    try:
        v = json.loads(raw)
        return v if isinstance(v, dict) else {"name": str(v)}
    except ValueError:
        return {"name": raw}


def _data_stamp(prefix: str) -> Optional[dict]:
    """The generator stamp (bench/reference/make_data.py writes PREFIX.json) for a data prefix, if any."""
    from ..data.sft_format import INPUT_IDS_SUFFIX, LOSS_MASK_SUFFIX
    for suf in ("_text_document", INPUT_IDS_SUFFIX, LOSS_MASK_SUFFIX, ""):
        if prefix.endswith(suf):
            path = prefix[: len(prefix) - len(suf)] + ".json" if suf else prefix + ".json"
            try:
                with open(path) as f:
                    d = json.load(f)
                if isinstance(d, dict) and "generator" in d:
                    return d
            except (OSError, ValueError):
                continue
    return None


def data_section(data_cfg, seed: int, sft: bool) -> Dict[str, Any]:
    """Files, sizes and (where cached) hashes of the run's data; the checksum is filled by ``hash_data``."""
    if getattr(data_cfg, "mock_data", False):
        # the ids are drawn from the training seed, like a real corpus's order: not part of the checksum
        return {"mock": True, "seed": seed, "checksum": "mock-data", "files": {}}
    paths = list(getattr(data_cfg, "data_path", ()) or ())
    out: Dict[str, Any] = {"data_path": paths, "sft": sft, "files": {}, "checksum": None}
    if not paths:
        return out
    try:
        files = checksum.data_files(paths, sft)
    except Exception as e:
        out["error"] = str(e)
        return out
    cache = checksum._load_cache()
    for f in files:
        try:
            size = os.path.getsize(f)
        except OSError:
            out["files"][f] = {"bytes": None, "sha256": None, "error": "missing"}
            continue
        out["files"][f] = {"bytes": size, "sha256": checksum.cached_sha256(f, cache)}
    from ..data.blended_dataset import parse_data_path
    try:
        stamps = {p: _data_stamp(p) for p in parse_data_path(paths)[1]}
        stamps = {p: s for p, s in stamps.items() if s}
        if stamps:
            out["generator"] = stamps
    except Exception:
        pass
    return out


def hash_data(section: Dict[str, Any]) -> None:
    """Fill every file's sha256 (streamed, cached) and the combined checksum, in place."""
    hashes = {}
    for f, info in section.get("files", {}).items():
        if info.get("error"):
            continue
        if not info.get("sha256"):
            info["sha256"] = checksum.file_sha256(f)
        hashes[f] = info["sha256"]
    if hashes and len(hashes) == len(section["files"]):
        section["checksum"] = checksum.data_checksum(hashes)


def _layout(parallel, vp: int, num_microbatches: int, global_batch_size: int, micro_batch_size: int
            ) -> Dict[str, Any]:
    return {"world_size": parallel.world_size, "tp": parallel.tp, "pp": parallel.pp, "vp": vp, "cp": parallel.cp,
            "ep": parallel.ep, "etp": parallel.etp, "dp": parallel.dp, "edp": parallel.edp,
            "sequence_parallel": parallel.sequence_parallel,
            "distributed_optimizer": parallel.use_distributed_optimizer,
            "micro_batch_size": micro_batch_size, "num_microbatches": num_microbatches,
            "global_batch_size": global_batch_size,
            "first_stage_layers": parallel.decoder_first_pipeline_num_layers,
            "last_stage_layers": parallel.decoder_last_pipeline_num_layers,
            "dispatcher": parallel.moe_token_dispatcher_type}


def _args_dict(args) -> Dict[str, Any]:
    if args is None:
        return {}
    d = {k: v for k, v in vars(args).items() if not k.startswith("compat_") or k == "compat_resolved"}
    d.pop("compat_resolved", None)
    return json_safe(d)


def collect(*, args, stage: str, model, parallel, optimizer, training, data, devices: Sequence[dict], vp: int,
            num_microbatches: int, global_batch_size: int, flops_per_token: float,
            peak_tflops: Optional[float], peak_source: str) -> Dict[str, Any]:
    """The metadata dict (without the data hashes: ``hash_data(meta['data'])`` adds them)."""
    from ..platform import info
    d0 = dict(devices[0]) if devices else info.local_device()
    hosts = sorted({d.get("host") for d in devices}) if devices else [d0.get("host")]
    precision = "bf16" if getattr(optimizer, "bf16", False) else ("fp16" if getattr(optimizer, "fp16", False)
                                                                  else "fp32")
    hardware = {
        "platform": d0.get("kind"), "device_name": d0.get("name"), "device_count": parallel.world_size,
        "device_memory_bytes": d0.get("memory_bytes"), "memory_kind": d0.get("memory_kind"),
        "nodes": len(hosts), "devices_per_node": max(1, parallel.world_size // max(1, len(hosts))),
        "devices_visible_per_node": d0.get("devices_on_node"), "cpu": d0.get("cpu"),
        "interconnect": info.interconnect(),
        "device_names": sorted({str(d.get("name")) for d in devices}) if devices else [d0.get("name")],
        "device_memory_bytes_min": min((d.get("memory_bytes") or 0) for d in devices) if devices else None,
    }
    for k in ("compute_capability", "multiprocessors"):
        if k in d0:
            hardware[k] = d0[k]
    seq = training.seq_length
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "stage": stage,
        "command": list(sys.argv),
        "recipe": recipe_info(),
        "seed": training.seed,
        "precision": precision,
        "hardware": hardware,
        "software": info.software(),
        "library": library_info(),
        "layout": _layout(parallel, vp, num_microbatches, global_batch_size, training.micro_batch_size),
        "config": {"model": json_safe(model), "parallel": json_safe(parallel), "optimizer": json_safe(optimizer),
                   "training": json_safe(training), "data": json_safe(data), "args": _args_dict(args)},
        "kernels": kernel_table(),
        "data": data_section(data, training.seed, stage == "sft"),
        "throughput": {"flops_per_token": flops_per_token, "tokens_per_step": global_batch_size * seq,
                       "peak_tflops_per_device": peak_tflops, "peak_source": peak_source},
        "hosts": hosts,
    }


def write_json(path: str, obj: Dict[str, Any]) -> None:
    """Atomic: a reader never sees half a file."""
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "w") as f:
        json.dump(json_safe(obj), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def read_metadata(run_dir: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(run_dir, METADATA_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def peak_source(flag: Optional[float], peak: Optional[float]) -> str:
    """Where the MFU peak came from (monitoring/throughput.resolve_peak_tflops' order)."""
    if flag:
        return "--peak-tflops"
    if peak is None:
        return "none (MFU n/a)"
    from .. import platform
    plat = platform.get_platform()
    if platform.peak_tflops(plat.device_name) is not None:
        return f"device table (platform/devices.py: {plat.device_name})"
    return "measured matmul ceiling (CPU)"


def probe_tflops(device: torch.device) -> float:
    """TFLOP/s of one fixed GEMM on this rank (median of 3): the straggler probe. Deterministic inputs, no RNG."""
    acc = device.type != "cpu"
    n = 2048 if acc else 256
    dtype = torch.bfloat16 if acc else torch.float32
    a = torch.full((n, n), 0.5, dtype=dtype, device=device)
    b = torch.full((n, n), 0.25, dtype=dtype, device=device)
    from .. import platform
    a @ b
    platform.synchronize()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        platform.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2.0 * n ** 3 / max(times[1], 1e-9) / 1e12


class RunRecorder:
    """Writes run_metadata.json at start and rank_stats.jsonl every ``interval`` iterations (see module doc)."""

    def __init__(self, out_dir: Optional[str], rank: int, world: int, writer_rank: int, interval: int,
                 device: torch.device, meta: Optional[Dict[str, Any]] = None):
        self.out_dir, self.rank, self.world, self.writer_rank = out_dir, rank, world, writer_rank
        self.interval = max(1, int(interval))
        self.device = device
        self.meta = meta
        self._iters: List[int] = []
        self._secs: List[float] = []
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.probe = os.environ.get(PROBE_ENV, "1") not in ("0", "off", "false")
        self.enabled = out_dir is not None

    @property
    def is_writer(self) -> bool:
        return self.enabled and self.rank == self.writer_rank

    @property
    def metadata_path(self) -> Optional[str]:
        return os.path.join(self.out_dir, METADATA_FILE) if self.out_dir else None

    @classmethod
    def start(cls, *, out_dir: Optional[str], rank: int, world: int, writer_rank: int, interval: int,
              device: torch.device, print_fn=None, **collect_kw) -> "RunRecorder":
        """Every rank calls this once (it all-gathers each rank's device description when out_dir is set)."""
        rec = cls(out_dir, rank, world, writer_rank, interval, device)
        if not rec.enabled:
            if print_fn and rank == writer_rank:
                print_fn("run metadata: not written (no --tensorboard-dir or --save to put run_metadata.json in)")
            return rec
        from ..platform import info
        mine = info.local_device()
        devices: List[dict] = [mine]
        if dist.is_initialized() and world > 1:
            devices = [None] * world  # type: ignore[list-item]
            dist.all_gather_object(devices, mine)
        if not rec.is_writer:
            return rec
        meta = collect(devices=devices, **collect_kw)
        rec.meta = meta
        os.makedirs(out_dir, exist_ok=True)
        rec._keep_previous()
        pending = [f for f, i in meta["data"].get("files", {}).items() if not i.get("sha256") and not i.get("error")]
        size = sum(meta["data"]["files"][f]["bytes"] or 0 for f in pending)
        if os.environ.get(CHECKSUM_ENV, "on") in ("off", "0", "false"):
            meta["data"]["checksum"] = (meta["data"].get("checksum")
                                        or "not computed (MEGATRON_ASCEND_DATA_CHECKSUM=off)")
            write_json(rec.metadata_path, meta)
        elif size <= int(os.environ.get(HASH_SYNC_ENV, str(2 << 30))):
            hash_data(meta["data"])
            write_json(rec.metadata_path, meta)
        else:
            meta["data"]["checksum"] = "pending: hashing in the background"
            write_json(rec.metadata_path, meta)
            rec._thread = threading.Thread(target=rec._hash_later, name="run-metadata-hash", daemon=False)
            rec._thread.start()
        if print_fn:
            print_fn(f"run metadata: {rec.metadata_path} (data checksum "
                     f"{str(meta['data'].get('checksum'))[:16]}, git {str(meta['library'].get('git_commit'))[:12]})")
        return rec

    @classmethod
    def for_trainer(cls, trainer, peak_tflops: Optional[float]) -> "RunRecorder":
        """``start`` with what a Trainer knows (duck-typed: monitoring does not import training/)."""
        t = trainer
        logger = getattr(t, "logger", None)
        return cls.start(
            out_dir=output_dir(t.train_cfg), rank=t.rank, world=t.world, writer_rank=t.world - 1,
            interval=t.train_cfg.log_interval, device=t.device, print_fn=getattr(logger, "print_fn", None),
            args=t.args, stage=t.stage, model=t.model_cfg, parallel=t.par, optimizer=t.opt_cfg,
            training=t.train_cfg, data=t.data_cfg, vp=t.vp, num_microbatches=t.num_micro,
            global_batch_size=t.gbs, flops_per_token=t.flops_per_token, peak_tflops=peak_tflops,
            peak_source=peak_source(t.train_cfg.peak_tflops, peak_tflops))

    def _keep_previous(self) -> None:
        path = self.metadata_path
        if os.path.exists(path):
            n = 1
            while os.path.exists(os.path.join(self.out_dir, f"run_metadata.prev-{n}.json")):
                n += 1
            os.replace(path, os.path.join(self.out_dir, f"run_metadata.prev-{n}.json"))

    def _hash_later(self) -> None:
        data = json.loads(json.dumps(self.meta["data"]))
        data["checksum"] = None
        hash_data(data)
        with self._lock:
            self.meta["data"] = data
            write_json(self.metadata_path, self.meta)

    def wait(self, timeout: Optional[float] = None) -> None:
        """Wait for the background data hash (tests; the interpreter also waits for it at exit)."""
        if self._thread is not None:
            self._thread.join(timeout)

    # -- per-rank statistics ---------------------------------------------------------------------------------
    def on_iteration(self, iteration: int, seconds: float) -> None:
        """Every rank, after every step. Collective every ``interval`` iterations."""
        if not self.enabled:
            return
        self._iters.append(int(iteration))
        self._secs.append(float(seconds))
        if len(self._iters) >= self.interval:
            self._flush()

    def finish(self) -> None:
        """Every rank, after the loop ends normally: gathers the last partial interval (collective)."""
        if self.enabled and self._iters:
            self._flush()

    def _flush(self) -> None:
        n = len(self._iters)
        mem = memory_scalars()
        probe = probe_tflops(self.device) if self.probe else float("nan")
        # float32: every backend (HCCL included) gathers it; seconds and bytes keep 7 significant digits
        vec = torch.tensor(self._secs + [mem["mem-allocated-bytes"], mem["mem-max-allocated-bytes"],
                                         mem["mem-reserved-bytes"], probe], dtype=torch.float32, device=self.device)
        if dist.is_initialized() and self.world > 1:
            parts = [torch.empty_like(vec) for _ in range(self.world)]
            dist.all_gather(parts, vec)
            rows = torch.stack(parts).cpu()
        else:
            rows = vec.cpu()[None]
        iters = self._iters
        self._iters, self._secs = [], []
        if not self.is_writer:
            return
        secs = rows[:, :n]
        line = {"iterations": iters, "time": time.time(),
                "step_seconds_max": [round(float(x), 6) for x in secs.max(0).values],
                "step_seconds_min": [round(float(x), 6) for x in secs.min(0).values],
                "rank_step_seconds_mean": [round(float(x), 6) for x in secs.mean(1)],
                "rank_mem_allocated_bytes": [int(x) for x in rows[:, n]],
                "rank_mem_max_allocated_bytes": [int(x) for x in rows[:, n + 1]],
                "rank_mem_reserved_bytes": [int(x) for x in rows[:, n + 2]],
                "rank_probe_tflops": [None if math.isnan(float(x)) else round(float(x), 6) for x in rows[:, n + 3]]}
        with open(os.path.join(self.out_dir, RANK_STATS_FILE), "a") as f:
            f.write(json.dumps(line) + "\n")
