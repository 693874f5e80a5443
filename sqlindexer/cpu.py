"""What the CPU in front of us computes natively, and the dtype that follows for the model.

bfloat16 halves the bytes the model moves and, on a CPU with bf16 arithmetic (AVX512-BF16,
AMX, Arm's BF16 extension), roughly doubles the vision tower's speed; on a CPU without it
torch emulates bf16 and runs several times slower than float32. So `--dtype auto` on a
CPU is decided here, from the features the CPU reports at run time, never by a constant.
"""

from __future__ import annotations

import logging
import platform
import subprocess
import sys
from collections.abc import Iterable

log = logging.getLogger(__name__)

# Feature names as Linux's /proc/cpuinfo spells them ("flags" on x86, "Features" on Arm),
# in the order a reason names them: each is native bf16 arithmetic that torch (oneDNN)
# and OpenVINO use.
NATIVE_BF16 = ("amx_bf16", "avx512_bf16", "bf16")
# macOS reports Arm features through sysctl, as FEAT_* names.
_MACOS_SYSCTL = {"hw.optional.arm.FEAT_BF16": "bf16"}


def choose_dtype(features: Iterable[str]) -> tuple[str, str]:
    """The dtype for the model on a CPU with these features, and the reason, e.g.
    ("bfloat16", "avx512_bf16") or ("float32", "no native bfloat16")."""
    have = {f.lower() for f in features}
    for name in NATIVE_BF16:
        if name in have:
            return "bfloat16", name
    return "float32", "no native bfloat16"


def features() -> frozenset[str]:
    """The CPU's feature names, lower case: /proc/cpuinfo on Linux, sysctl on macOS, plus
    torch's own cpuid probe when torch is already imported (which also covers systems
    with neither, such as Windows). Never imports torch itself."""
    found = set(_linux_features()) | set(_macos_features())
    found |= _torch_features()
    return frozenset(found)


def _linux_features() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    # Every core lists the same; the first is enough.
                    return set(value.lower().split())
    except OSError:
        pass
    return set()


def _macos_features() -> set[str]:
    if sys.platform != "darwin":
        return set()
    found = set()
    for key, name in _MACOS_SYSCTL.items():
        try:
            done = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=2, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0 and done.stdout.strip() == "1":
            found.add(name)
    return found


def _torch_features() -> set[str]:
    torch = sys.modules.get("torch")
    cpu = getattr(torch, "cpu", None)
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    found = set()
    for name, probe in probes.items():
        try:
            if getattr(cpu, probe)():
                found.add(name)
        except Exception:  # noqa: BLE001, S112 - a private probe that this torch may lack
            continue
    return found


def model_name() -> str:
    """The CPU's model name, for benchmark records ("AMD EPYC", "Apple M2")."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("model name", "hardware", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            done = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=2, check=False)
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


_logged = False


def auto_dtype() -> str:
    """choose_dtype() for this machine's CPU, logged once per process."""
    global _logged
    dtype, reason = choose_dtype(features())
    if not _logged:
        _logged = True
        log.info("cpu: %s (%s)", dtype, reason)
    return dtype
