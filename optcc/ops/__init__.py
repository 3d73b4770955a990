"""Runtime ops: torch.library ops that optimized graphs call (quantized.py, kv_cache.py),
their ONNX translations, their lowerings for the compiled torch artifact (lowering.py), and
Triton kernels (kernels/).

ONNX_TRANSLATIONS maps each custom op to its onnxscript translation; the modules that
define ops fill it (register_onnx_translation) and export hands it to torch.onnx.export
without knowing what the ops are.
"""
from __future__ import annotations

from typing import Callable

ONNX_TRANSLATIONS: dict[Callable, Callable] = {}

# op -> its lowering for the compiled torch artifact (lowering.py): called with the node's
# arguments (constants as tensors) and `vnni=`, it returns (function in ATen ops, arguments, kernel
# name); export/compiled.py puts that call in the node's place before AOTInductor compiles, so the
# package holds no Python op and Inductor sees the patterns it lowers to oneDNN kernels.
COMPILE_LOWERINGS: dict[Callable, Callable] = {}


def register_onnx_translation(op: Callable, fn: Callable) -> None:
    ONNX_TRANSLATIONS[op] = fn


def register_compile_lowering(op: Callable, fn: Callable) -> None:
    COMPILE_LOWERINGS[op] = fn
