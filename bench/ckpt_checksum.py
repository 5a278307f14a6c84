"""Cost of checkpoint integrity records: a save with SHA-256 streamed while DCP writes (integrity.py's
HashingFileSystemWriter) against DCP's plain FileSystemWriter, and load-side verification (re-reading and
hashing every file) against the load itself, for a tiny and a larger checkpoint, one process.

    python bench/ckpt_checksum.py [--sizes-mib 1 256] [--repeats 5]

Prints the median times and the ratios. Writes go to a temporary directory (page cache: the ratio is an upper
bound of the relative cost on a real file system, where the write itself is slower)."""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402

from megatron_ascend.checkpointing.dcp_io import Chunk, ChunkSavePlanner, read_chunks, write_chunks  # noqa: E402
from megatron_ascend.checkpointing.integrity import file_record  # noqa: E402


def plain_write(path, chunks):
    w = dcp.FileSystemWriter(path, single_file_per_rank=True, sync_files=True, thread_count=1, overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({}, storage_writer=w, planner=ChunkSavePlanner(chunks), no_dist=True)


def timed(fn, repeats):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--sizes-mib", type=float, nargs="+", default=[1, 256])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    root = tempfile.mkdtemp(prefix="ckpt_sum_")
    try:
        for mib in a.sizes_mib:
            n = int(mib * 2 ** 20 / 4)
            rows = max(1, n // 1024)
            chunks = [Chunk(f"w{i}", (rows // 4 or 1, 1024), (0, 0), torch.randn(rows // 4 or 1, 1024)) for i in range(4)]
            p1, p2 = os.path.join(root, "plain"), os.path.join(root, "hashed")

            def clean(p):
                shutil.rmtree(p, ignore_errors=True)
            t_plain = timed(lambda: (clean(p1), plain_write(p1, chunks)), a.repeats)
            t_hash = timed(lambda: (clean(p2), write_chunks(p2, chunks)), a.repeats)
            outs = [Chunk(c.fqn, c.global_shape, c.offsets, torch.empty_like(c.tensor)) for c in chunks]
            t_load = timed(lambda: read_chunks(p2, outs), a.repeats)
            t_verify = timed(lambda: [file_record(os.path.join(p2, f)) for f in os.listdir(p2)], a.repeats)
            size = sum(os.path.getsize(os.path.join(p2, f)) for f in os.listdir(p2))
            print(f"{size / 2 ** 20:9.2f} MiB checkpoint: save {t_plain * 1e3:8.2f} ms plain, {t_hash * 1e3:8.2f} ms with "
                  f"SHA-256 streamed (x{t_hash / t_plain:.2f}); load {t_load * 1e3:8.2f} ms, verify {t_verify * 1e3:8.2f} "
                  f"ms (+{100 * t_verify / t_load:.0f}% of the load, one rank; spread over the ranks at load)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
