"""Versions and machine facts recorded next to every number."""
from __future__ import annotations

import importlib.metadata as md
import platform

import torch


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The CPU features that decide which kernels are fast: bf16 / int8 dot products, AMX tiles.
RELEVANT_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
                  "amx_tile", "amx_bf16", "amx_int8", "asimddp", "i8mm", "bf16", "sve")


def environment() -> dict:
    from optcc import __version__
    from optcc.ops.quantized import cpu_flags

    return {
        "optcc": __version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "transformers": _version("transformers"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "onnxscript": _version("onnxscript"),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_flags": [f for f in RELEVANT_FLAGS if f in cpu_flags()],
        "threads": torch.get_num_threads(),
    }
