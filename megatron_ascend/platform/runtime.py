"""Runtime options of the device back ends, read from the command line: process-group timeout, the HCCL
environment a 910B / 910C job needs, launch blocking, NPU compile mode, deterministic mode, profiling.

``RuntimeOptions.from_args(args)`` reads the namespace (flags of arguments.py; absent attributes take the
defaults, so a namespace without them works) and checks every value against its documented range
(ConfigError naming the flag and the range). ``platform.init_distributed(options=...)`` applies them: the
environment before the process group (HCCL reads it when a communicator is created, the runtime when the device
is first touched), then the back end's runtime switches (npu.py / cuda.py). Each back end reports what it set and
which flags have no effect on it; ``startup_lines()`` returns those lines for the trainer to print once.

Sources: ../shared/reference/ascend_npu.md §7.2 (set_compile_mode), §7.3 (determinism), §7.4 (profiler), §8.2
(HCCL_CONNECT_TIMEOUT [120, 7200] s, default 120; HCCL_EXEC_TIMEOUT [0, 2147483647] s, default 1836; HCCL_BUFFSIZE
MB >= 1, default 200; ASCEND_LAUNCH_BLOCKING).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from ..config import ConfigError

# flag, attribute, (low, high) inclusive, unit
HCCL_RANGES = {
    "hccl_connect_timeout": ("--hccl-connect-timeout", (120, 7200), "s"),
    "hccl_exec_timeout": ("--hccl-exec-timeout", (0, 2147483647), "s"),
    "hccl_buffsize": ("--hccl-buffsize", (1, 2 ** 31 - 1), "MB"),
}


@dataclass(frozen=True)
class ProfileOptions:
    enabled: bool = False
    step_start: int = 10
    step_end: int = 12
    ranks: Tuple[int, ...] = (0,)
    save_path: Optional[str] = None

    def check(self) -> None:
        if self.enabled and not (0 < self.step_start < self.step_end):
            raise ConfigError(f"--profile-step-start {self.step_start} / --profile-step-end {self.step_end}: need "
                              f"0 < start < end (iterations are counted from 1; end is exclusive)")


@dataclass(frozen=True)
class RuntimeOptions:
    timeout_minutes: float = 30.0
    hccl_connect_timeout: Optional[int] = None
    hccl_exec_timeout: Optional[int] = None
    hccl_buffsize: Optional[int] = None
    launch_blocking: bool = False
    jit_compile: bool = False
    deterministic: bool = False
    profile: ProfileOptions = field(default_factory=ProfileOptions)

    @classmethod
    def from_args(cls, args) -> "RuntimeOptions":
        g = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        prof = ProfileOptions(enabled=bool(g("profile", False)), step_start=int(g("profile_step_start", 10)),
                              step_end=int(g("profile_step_end", 12)),
                              ranks=tuple(g("profile_ranks", None) or (0,)),
                              save_path=g("profile_save_path") or g("tensorboard_dir"))
        opts = cls(timeout_minutes=float(g("distributed_timeout_minutes", 30.0) or 30.0),
                   hccl_connect_timeout=g("hccl_connect_timeout"), hccl_exec_timeout=g("hccl_exec_timeout"),
                   hccl_buffsize=g("hccl_buffsize"), launch_blocking=bool(g("device_launch_blocking", False)),
                   jit_compile=bool(g("jit_compile", False)), deterministic=bool(g("deterministic", False)),
                   profile=prof)
        opts.check()
        return opts

    def check(self) -> None:
        if not self.timeout_minutes > 0:
            raise ConfigError(f"--distributed-timeout-minutes {self.timeout_minutes} must be > 0")
        for attr, (flag, (lo, hi), unit) in HCCL_RANGES.items():
            v = getattr(self, attr)
            if v is not None and not (lo <= v <= hi):
                raise ConfigError(f"{flag} {v} is outside HCCL's range [{lo}, {hi}] {unit} (CANN environment "
                                  f"variable reference); pick a value inside it")
        self.profile.check()

    def hccl_flags_given(self) -> List[str]:
        return [flag for attr, (flag, _, _) in HCCL_RANGES.items() if getattr(self, attr) is not None]


_LINES: List[str] = []


def record(line: str) -> None:
    """A start-up line of the platform layer (what was set, what has no effect here)."""
    if line not in _LINES:
        _LINES.append(line)


def startup_lines() -> List[str]:
    return list(_LINES)


def clear() -> None:
    _LINES.clear()
