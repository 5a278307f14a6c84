import os

os.environ.setdefault("MEGATRON_ASCEND_DEVICE", "cpu")


def pytest_report_header(config):
    """Which CPU kernels and thread counts this run uses (tests/run_cpu_matrix.py varies them)."""
    import torch

    from tests.harness import worker_threads
    env = " ".join(f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                                                   "OMP_NUM_THREADS") if k in os.environ)
    return (f"cpu kernels: {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} intra-op threads "
            f"here, {worker_threads()} in distributed test workers{'; ' + env if env else ''}")
