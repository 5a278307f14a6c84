"""Platform detection, backend choice, peak-FLOP table and the reference kernels."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from megatron_ascend.platform import device as dev
from megatron_ascend.platform import kernels, peak_tflops
from tests.tolerance import assert_close


def test_forced_cpu_uses_gloo(monkeypatch):
    monkeypatch.setenv("MEGATRON_ASCEND_DEVICE", "cpu")
    p = dev.detect_platform()
    assert p.kind == "cpu" and p.backend == "gloo" and p.device() == torch.device("cpu")


def test_bad_forced_device(monkeypatch):
    monkeypatch.setenv("MEGATRON_ASCEND_DEVICE", "tpu")
    with pytest.raises(ValueError, match="MEGATRON_ASCEND_DEVICE='tpu'"):
        dev.detect_platform()


def test_npu_detected_when_torch_npu_present(monkeypatch):
    """A stand-in torch_npu: detection picks npu / hccl and the 910B3 peak from the table."""
    monkeypatch.delenv("MEGATRON_ASCEND_DEVICE", raising=False)
    fake = types.ModuleType("torch_npu")
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    npu = types.SimpleNamespace(device_count=lambda: 8, get_device_name=lambda i=0: "Ascend910B3")
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    p = dev.detect_platform()
    assert (p.kind, p.backend, p.device_name) == ("npu", "hccl", "Ascend910B3")
    assert peak_tflops(p.device_name) == 294.9


def test_no_npu_devices_falls_back(monkeypatch):
    monkeypatch.delenv("MEGATRON_ASCEND_DEVICE", raising=False)
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(device_count=lambda: 0), raising=False)
    assert dev.detect_platform().kind in ("cuda", "cpu")


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Ascend910B1") == 378.9
    assert peak_tflops("cpu") is None
    assert peak_tflops("cpu", override=1.5) == 1.5


def test_reference_kernels():
    torch.manual_seed(0)
    x, w = torch.randn(5, 8), torch.randn(8)
    ref = w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6))
    assert_close(kernels.get("rms_norm")(x, w, 1e-6), ref, "rms_norm", terms=8)  # mean of 8 squares
    g, u = torch.randn(4, 6) * 20, torch.randn(4, 6) * 20
    # elementwise: a few roundings (exp, divide, multiply) per element
    assert_close(kernels.get("swiglu")(g, u), F.silu(g) * u, "swiglu", terms=4)
    assert_close(kernels.get("swiglu")(g, u, 10.0), F.silu(g.clamp(max=10)) * u.clamp(-10, 10), "clamped swiglu",
                 terms=4)
    xs, ws, counts = torch.randn(7, 3), torch.randn(3, 2, 3), [3, 0, 4]  # weight [G, out, in]
    out = kernels.reference_of("grouped_matmul")(xs, ws, counts)
    assert_close(out, torch.cat([xs[:3] @ ws[0].t(), xs[3:] @ ws[2].t()]), "grouped_matmul", terms=3)  # inner 3
    assert set(kernels.table()) >= {"rms_norm", "swiglu", "grouped_matmul", "moe_permute"}


def test_host_allocator_tuning(monkeypatch):
    """glibc's mallopt is applied on Linux (the CI and this machine), refused on request."""
    import platform as pyplatform
    from megatron_ascend.platform import tune_host_allocator
    monkeypatch.setenv("MA_HOST_ALLOCATOR", "system")
    assert tune_host_allocator() is False
    monkeypatch.delenv("MA_HOST_ALLOCATOR")
    if pyplatform.system() == "Linux" and pyplatform.libc_ver()[0] == "glibc":
        assert tune_host_allocator() is True
