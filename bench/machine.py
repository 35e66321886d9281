"""The CPU a benchmark ran on, as lscpu and /proc/cpuinfo name it (torch-free, for the bench scripts' JSON).

The matrix-unit flags decide which target applies (bench/train.py: 1.5x nanoGPT without AMX, 2x with), so they
are reported beside the model name rather than left to the reader to look up.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

FLAGS = ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_report() -> dict:
    model, flags = "", set()
    if shutil.which("lscpu"):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name" and not model:
                model = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    if not flags and os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {
        "model_name": model or platform.processor() or platform.machine(),
        "usable_cpus": usable,
        "flags": {flag: flag in flags for flag in FLAGS},
        "system": platform.system(),
    }
