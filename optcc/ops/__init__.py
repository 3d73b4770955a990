"""Runtime ops: torch.library ops that optimized graphs call (quantized.py, kv_cache.py),
their ONNX translations, and Triton kernels (kernels/).

ONNX_TRANSLATIONS maps each custom op to its onnxscript translation; the modules that
define ops fill it (register_onnx_translation) and export hands it to torch.onnx.export
without knowing what the ops are.
"""
from __future__ import annotations

from typing import Callable

ONNX_TRANSLATIONS: dict[Callable, Callable] = {}


def register_onnx_translation(op: Callable, fn: Callable) -> None:
    ONNX_TRANSLATIONS[op] = fn
