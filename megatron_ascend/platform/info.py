"""What this machine is, for run metadata: device name / count / memory, driver and toolkit versions (CUDA or
CANN), the torch / torch_npu / MindSpeed versions and what the platform says about its interconnect.

Every probe is best effort and bounded: a missing tool or file gives ``None`` (or leaves the key out), a tool
that answers slowly is cut off after a few seconds; nothing here raises. Used by
monitoring/run_metadata.py; the only module outside platform/device.py that looks at CUDA / NPU specifics.
"""
from __future__ import annotations

import glob
import os
import platform as _pyplatform
import re
import socket
import subprocess
import sys
from typing import Dict, List, Optional

import torch

from .device import get_platform

ASCEND_HOME_DEFAULT = "/usr/local/Ascend"


def _run(cmd: List[str], timeout: float = 5.0) -> Optional[str]:
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def _read(path: str) -> Optional[str]:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _dist_version(name: str) -> Optional[str]:
    try:
        from importlib import metadata
        return metadata.version(name)
    except Exception:
        return None


def _cpu_model() -> Optional[str]:
    text = _read("/proc/cpuinfo") or ""
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return m.group(1).strip() if m else (_pyplatform.processor() or None)


def _host_memory_bytes() -> Optional[int]:
    m = re.search(r"^MemTotal:\s*(\d+)\s*kB", _read("/proc/meminfo") or "", re.M)
    return int(m.group(1)) * 1024 if m else None


def local_device() -> Dict[str, object]:
    """This process's device: kind, name, total memory in bytes, devices visible on the node, host name."""
    plat = get_platform()
    out: Dict[str, object] = {"kind": plat.kind, "name": plat.device_name, "host": socket.gethostname(),
                              "local_rank": int(os.environ.get("LOCAL_RANK", "0"))}
    mod = plat.module
    if mod is None:
        out.update(memory_bytes=_host_memory_bytes(), memory_kind="host RAM", devices_on_node=os.cpu_count(),
                   cpu=_cpu_model())
        return out
    try:
        props = mod.get_device_properties(plat.device())
        out["memory_bytes"] = int(getattr(props, "total_memory", 0)) or None
        cap = (getattr(props, "major", None), getattr(props, "minor", None))
        if cap[0] is not None:
            out["compute_capability"] = f"{cap[0]}.{cap[1]}"
        if getattr(props, "multi_processor_count", None):
            out["multiprocessors"] = int(props.multi_processor_count)
    except Exception:
        out["memory_bytes"] = None
    try:
        out["devices_on_node"] = int(mod.device_count())
    except Exception:
        pass
    out["memory_kind"] = "device HBM"
    out["cpu"] = _cpu_model()
    return out


def _cann_version() -> Optional[str]:
    home = os.environ.get("ASCEND_TOOLKIT_HOME") or os.path.join(ASCEND_HOME_DEFAULT, "ascend-toolkit", "latest")
    for pattern in ("version.cfg", "*/ascend_toolkit_install.info", "compiler/version.info",
                    "runtime/version.info"):
        for path in sorted(glob.glob(os.path.join(home, pattern))):
            text = _read(path) or ""
            m = re.search(r"(?:^|\n)\s*(?:version|Version|toolkit_installed_version)\s*=\s*\[?([^\]\n]+)", text)
            if m:
                return m.group(1).strip().split(":")[-1]
    return None


def _ascend_driver_version() -> Optional[str]:
    text = _read(os.path.join(ASCEND_HOME_DEFAULT, "driver", "version.info")) or ""
    m = re.search(r"(?:^|\n)\s*Version\s*=\s*(\S+)", text)
    return m.group(1) if m else None


def _nvidia_driver_version() -> Optional[str]:
    text = _read("/proc/driver/nvidia/version")
    if text:
        m = re.search(r"Kernel Module\s+(\S+)", text)
        if m:
            return m.group(1)
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.strip().splitlines()[0] if out and out.strip() else None


def software() -> Dict[str, Optional[str]]:
    """Versions that change numerics or speed: Python, torch, numpy, CUDA / cuDNN / NCCL or CANN / torch_npu /
    MindSpeed, and the device driver."""
    plat = get_platform()
    out: Dict[str, Optional[str]] = {
        "python": sys.version.split()[0], "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None), "numpy": _dist_version("numpy"),
        "os": f"{_pyplatform.system()} {_pyplatform.release()}",
    }
    if plat.kind == "cuda" or torch.version.cuda:
        out["cuda"] = torch.version.cuda
        try:
            out["cudnn"] = str(torch.backends.cudnn.version())
        except Exception:
            out["cudnn"] = None
        if plat.kind == "cuda":
            try:
                v = torch.cuda.nccl.version()
                out["nccl"] = ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
            except Exception:
                out["nccl"] = None
            out["driver"] = _nvidia_driver_version()
    if plat.kind == "npu":
        out["torch_npu"] = _dist_version("torch_npu") or _dist_version("torch-npu")
        out["cann"] = _cann_version()
        out["driver"] = _ascend_driver_version()
    for name in ("mindspeed", "apex", "transformer_engine"):
        v = _dist_version(name)
        if v is not None:
            out[name] = v
    return out


_COMM_ENV = re.compile(r"^(NCCL|HCCL|GLOO|UCX|NVSHMEM)_")


def interconnect() -> Dict[str, object]:
    """What the platform says about links: ``nvidia-smi topo -m`` on CUDA, ``npu-smi info -t topo`` on Ascend
    (when the tools exist), and the communication library's environment variables."""
    plat = get_platform()
    out: Dict[str, object] = {"backend": plat.backend,
                              "env": {k: v for k, v in sorted(os.environ.items()) if _COMM_ENV.match(k)}}
    topo = None
    if plat.kind == "cuda":
        topo = _run(["nvidia-smi", "topo", "-m"])
        out["source"] = "nvidia-smi topo -m"
        if topo:
            out["nvlink"] = bool(re.search(r"\bNV\d+\b", topo))
    elif plat.kind == "npu":
        topo = _run(["npu-smi", "info", "-t", "topo"])
        out["source"] = "npu-smi info -t topo"
        if topo:
            out["hccs"] = "HCCS" in topo
    else:
        out["source"] = "none (CPU: processes talk over gloo / TCP on this host)"
    if topo:
        out["topology"] = topo.strip()[:4000]
    elif plat.kind != "cpu":
        out["topology"] = None
    return out
