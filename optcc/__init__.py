"""optcc: a declarative compiler that rewrites trained PyTorch models for deployment.

The Python API mirrors the CLI: `apply`, `tune`, `inspect_model`, `load_recipe`, `list_passes`.
"""
from __future__ import annotations

import os as _os

__version__ = "0.1.0"

# In a source checkout passes/ and cli.py sit beside this package (the wheel maps
# them to optcc/passes and optcc/cli.py). Let `optcc.passes` / `optcc.cli` resolve
# to them there too, without ever exposing `passes` or `cli` as top-level names.
_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "passes")) and _os.path.isfile(
    _os.path.join(_root, "passes", "__init__.py")
):
    __path__.append(_root)  # type: ignore[name-defined]  # noqa: F821


def __getattr__(name: str):
    # Lazy so that `import optcc` stays cheap (torch is imported on first use).
    if name in {"apply", "inspect_model", "list_passes", "load_recipe", "tune"}:
        from optcc import api

        return getattr(api, name)
    raise AttributeError(name)


# Quantized models saved as model.pt2 call optcc:: custom ops (optcc/ops/quantized.py); they must
# be registered before torch.export.load reads such a file, in any process. That needs
# torch, so `import optcc` imports it here.
from optcc.ops import quantized as _qops  # noqa: E402,F401
from optcc.ops import kv_cache as _kv_cache  # noqa: E402,F401
from optcc.ops import lowering as _lowering  # noqa: E402,F401  (their forms for the compiled artifact)
# The Triton kernels attach themselves to those ops on CUDA (optcc/ops/kernels; triton is only
# needed when a kernel first launches), so a quantized .pt2 loaded on a GPU runs them.
from optcc.ops import kernels as _kernels  # noqa: E402,F401
