"""What this CPU has for matrix work, read from ``/proc/cpuinfo``: its model name and the ISA
flags that decide which precisions can be fast (bf16 on AVX512_BF16 or AMX-BF16, int8 on
AVX512_VNNI, AVX-VNNI or AMX-INT8). Read once per process; a machine without /proc/cpuinfo
(macOS, Windows) has no flags, so only fp32 is assumed fast there."""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# The flags a bench prints, in this order (Linux's names).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
             "amx_int8", "amx_tile")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's model name and every flag of its first processor."""

    model: str
    flags: frozenset[str]

    def isa(self) -> dict[str, bool]:
        """Each of ``ISA_FLAGS``: present or not."""
        return {flag: flag in self.flags for flag in ISA_FLAGS}

    @property
    def bf16(self) -> str:
        """The flag that makes bf16 matmuls fast here (AMX first), or ''."""
        return next((f for f in BF16_FLAGS if f in self.flags), "")

    @property
    def int8(self) -> str:
        """The flag that makes int8 matmuls fast here (AMX first), or ''."""
        return next((f for f in INT8_FLAGS if f in self.flags), "")

    def signature(self) -> str:
        """Model name and the ISA flags present: two machines with the same signature choose
        the same precisions."""
        return f"{self.model}|{','.join(f for f in ISA_FLAGS if f in self.flags)}"


def parse_cpuinfo(text: str) -> CpuInfo:
    """The model name and flags of the first processor listed in a /proc/cpuinfo text (x86
    ``flags``, Arm ``Features``)."""
    model, flags = "", ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = value.strip()
        if model and flags:
            break
    return CpuInfo(model or platform.processor() or platform.machine(),
                   frozenset(flags.lower().split()))


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CPU (cached: it does not change while the process runs)."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    return parse_cpuinfo(text)
