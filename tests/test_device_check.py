"""bench/device_check.py's CPU path (--device cpu, tiny model, one iteration, no MFU step): the trainer on the
"device" (CPU bf16) and on the CPU (fp32) from the same seed, their per-iteration losses side by side, the
kernel-table start-up line, tools/forward.py on the CPU run's checkpoint both ways, the comparison verdicts.
The GPU / NPU run of the same command is what docs/ASCEND.md and docs/BENCHMARKS.md ask for."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_check_cpu_path(tmp_path):
    out = subprocess.run([sys.executable, "bench/device_check.py", "--device", "cpu", "--preset", "tiny", "--steps",
                          "1", "--mfu-steps", "0", "--keep", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHONPATH": ROOT})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "kernels (cpu): attention=" in log and "grouped_matmul=torch._grouped_mm" in log
    assert "loss: worst rel diff" in log and "-> OK bf16 tolerance" in log
    assert "logits: max |diff| / max |logit|" in log
    rows = [line for line in log.splitlines() if line.strip().startswith("1 ")]
    assert rows and len(rows[0].split()) == 4, log  # iteration, cpu loss, device loss, rel diff
    assert "tokens/s" in log and "MFU" in log
    assert os.path.isdir(tmp_path / "ckpt") and os.path.exists(tmp_path / "dev.pt")
