"""The NPU / CUDA back ends of the platform layer with a fake torch_npu and fake device counts: detection and the
device of each local rank, the environment a 910B / 910C job gets from the flags (and what is left alone), flag
ranges, compile mode, transfer_to_npu detection, flags without effect named, the profiler's steps, subgroups
created with the job's timeout."""
import argparse
import datetime

import pytest
import torch

from megatron_ascend import platform
from megatron_ascend.arguments import parse_args
from megatron_ascend.config import ConfigError
from megatron_ascend.platform import cuda, device, npu, runtime
from megatron_ascend.platform.profiler import StepProfiler
from megatron_ascend.platform.runtime import ProfileOptions, RuntimeOptions
from tests import fake_torch_npu


def test_detection_and_device_per_local_rank(monkeypatch):
    monkeypatch.delenv("MEGATRON_ASCEND_DEVICE", raising=False)
    with fake_torch_npu.install(device_count=16, device_name="Ascend910_9392"):
        p = device.detect_platform()
        assert (p.kind, p.backend, p.device_name) == ("npu", "hccl", "Ascend910_9392")
        assert p.device(5) == torch.device("npu", 5)
        monkeypatch.setenv("LOCAL_RANK", "3")
        assert p.device() == torch.device("npu", 3)
        assert platform.find_device(p.device_name).name == "Ascend910C"  # the planner's table knows the SoC name
    npu.check_local_rank(7, 8)
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "0,1,2,3")
    with pytest.raises(ConfigError, match=r"LOCAL_RANK 4 has no NPU: 4 visible \(ASCEND_RT_VISIBLE_DEVICES=0,1,2,3\)"
                                          r"; launch at most 4 processes per node"):
        npu.check_local_rank(4, 4)
    with pytest.raises(ConfigError, match="LOCAL_RANK 8 has no GPU: 8 visible"):
        cuda.check_local_rank(8, 8, {})
    with fake_torch_npu.install(device_count=0):
        assert device.detect_platform().kind in ("cuda", "cpu")


def _opts(argv):
    return RuntimeOptions.from_args(parse_args(argv))


def test_npu_environment_from_flags():
    env, notes = npu.environment(_opts([]), {})
    assert env == {}  # nothing given: the environment (and HCCL's defaults) are left alone
    assert any("HCCL_EXEC_TIMEOUT 1836 s" in n for n in notes)  # the HCCL default outlives the 30-min group timeout
    inherited = {"HCCL_CONNECT_TIMEOUT": "600", "HCCL_BUFFSIZE": "200"}
    opts = _opts(["--hccl-connect-timeout", "3600", "--hccl-exec-timeout", "1800", "--hccl-buffsize", "400",
                  "--device-launch-blocking"])
    opts = RuntimeOptions(**{**opts.__dict__, "timeout_minutes": 120.0, "deterministic": True})
    env, notes = npu.environment(opts, inherited)
    assert env == {"HCCL_CONNECT_TIMEOUT": "3600", "HCCL_EXEC_TIMEOUT": "1800", "HCCL_BUFFSIZE": "400",
                   "HCCL_DETERMINISTIC": "true", "LCCL_DETERMINISTIC": "1", "CLOSE_MATMUL_K_SHIFT": "1",
                   "ASCEND_LAUNCH_BLOCKING": "1"}
    assert "HCCL_CONNECT_TIMEOUT=3600 (--hccl-connect-timeout; replaces the environment's 600)" in notes
    assert "HCCL_BUFFSIZE=400 (--hccl-buffsize; replaces the environment's 200)" in notes
    assert not any("note:" in n for n in notes)  # 1800 s < 120 min: consistent
    for flag, bad in (("--hccl-connect-timeout", "60"), ("--hccl-exec-timeout", "-1"), ("--hccl-buffsize", "0")):
        with pytest.raises(ConfigError, match=f"{flag} {bad} is outside HCCL's range"):
            _opts([flag, bad])
    with pytest.raises(ConfigError, match="--profile-step-start 5 / --profile-step-end 5"):
        _opts(["--profile", "--profile-step-start", "5", "--profile-step-end", "5"])


def test_cuda_environment_and_flags_without_effect():
    env, notes = cuda.environment(_opts(["--device-launch-blocking", "--hccl-buffsize", "300", "--jit-compile"]), {})
    assert env == {"CUDA_LAUNCH_BLOCKING": "1"}
    assert "accepted, no effect on cuda: --hccl-buffsize --jit-compile (Ascend only)" in notes
    det = RuntimeOptions(deterministic=True)
    assert cuda.environment(det, {})[0] == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NCCL_ALGO": "Ring",
                                            "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0"}
    runtime.clear()
    device.apply_runtime_options(device.Platform("cpu", "cpu"), _opts(["--hccl-exec-timeout", "100"]))
    assert runtime.startup_lines() == ["platform: accepted, no effect on cpu: --hccl-exec-timeout"]
    runtime.clear()


def test_npu_runtime_switches(monkeypatch):
    with fake_torch_npu.install() as mod:
        notes = npu.configure(_opts([]), mod)
        assert mod.npu.state["jit_compile"] is False and "set_compile_mode(jit_compile=False)" in notes[0]
        npu.configure(_opts(["--jit-compile"]), mod)
        assert mod.npu.state["jit_compile"] is True
        assert not npu.transfer_to_npu_active(mod)
        monkeypatch.setattr(torch, "cuda", mod.npu)  # what transfer_to_npu does to torch.cuda
        assert npu.transfer_to_npu_active(mod)
        assert any("transfer_to_npu is active" in n for n in npu.configure(_opts([]), mod))


def test_profiler_steps(tmp_path):
    with fake_torch_npu.install() as mod:
        prof = StepProfiler(ProfileOptions(True, 2, 4, (0,), str(tmp_path)), rank=0, kind="npu")
        for it in range(1, 6):
            prof.before(it)
            prof.after(it)
        prof.close()
        assert prof.recorded == [2, 3]
        names = [n for n, _ in mod.calls if n.startswith("profiler")]
        assert names == ["profiler.profile", "profiler.start", "profiler.stop", "profiler.trace"]
        acts = [c for n, c in mod.calls if n == "profiler.profile"][0]["activities"]
        assert acts == ["CPU", "NPU"]
        off = StepProfiler(ProfileOptions(True, 2, 4, (1,), str(tmp_path)), rank=0, kind="npu")
        off.before(2)
        assert off._prof is None  # rank 0 is not in --profile-ranks


def test_subgroups_get_the_job_timeout(monkeypatch):
    import torch.distributed as dist
    seen = {}
    monkeypatch.setattr(dist, "new_group", lambda ranks, **kw: seen.update(ranks=ranks, **kw) or "g")
    monkeypatch.setattr(device, "_GROUP_TIMEOUT", datetime.timedelta(minutes=120))
    assert platform.new_group([0, 1]) == "g"
    assert seen == {"ranks": [0, 1], "timeout": datetime.timedelta(minutes=120)}


def test_memory_stats_from_the_npu_allocator(monkeypatch):
    with fake_torch_npu.install() as mod:
        for k, v in (("memory_allocated", 5), ("max_memory_allocated", 7), ("memory_reserved", 11),
                     ("max_memory_reserved", 13)):
            setattr(mod.npu, k, lambda v=v: v)
        prev = device.set_platform(device.Platform("npu", "Ascend910B3"))
        try:
            assert platform.memory_stats() == {"allocated": 5, "max_allocated": 7, "reserved": 11, "max_reserved": 13}
        finally:
            device.set_platform(prev)


def test_help_lists_the_device_flags(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in ("--hccl-connect-timeout", "--hccl-exec-timeout", "--hccl-buffsize", "--device-launch-blocking",
                 "--jit-compile", "--no-fused-kernels", "--reference-kernels", "--profile-step-start"):
        assert flag in out, flag
    assert isinstance(parse_args([]), argparse.Namespace)
