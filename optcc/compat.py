"""Every private torch API optcc touches, and every workaround for a torch behaviour, in one
place. Nothing else in optcc imports a private torch module or patches torch.

Each entry says why it exists and which upstream issue it works around, and is gated on the
torch versions it was checked against (pyproject: torch>=2.13,<2.14). On a newer torch an
entry still runs but warns once, so whoever raises the torch bound re-checks it: drop the
entry when upstream fixed the problem, or widen its gate.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import struct
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as _pytree  # torch has no public pytree module yet

TORCH = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


@functools.cache
def _gate(entry: str, checked: tuple[int, int], upstream: str) -> None:
    """Warn once when `entry` runs on a torch newer than the one it was checked against."""
    if TORCH > checked:
        warnings.warn(f"optcc.compat.{entry} was checked on torch <= {checked[0]}.{checked[1]}, this is "
                      f"{torch.__version__}: re-check {upstream} and update optcc/compat.py", stacklevel=3)


# ------------------------------------------------------------------ export ---

# related upstream: guards that reject valid inputs (#181097); the guard fn came with #161178
GUARDS_ISSUE = "https://github.com/pytorch/pytorch/issues/181097"


@contextlib.contextmanager
def no_guard_module() -> Iterator[None]:
    """Skip torch.export's generated input-guard module while exporting or loading a decoder.

    Why: in torch 2.13 the guard function that `ep.module()` generates raises on valid inputs of
    graphs with a KV cache (a zero-length past, a merged slot of length 0 or 1), and
    torch.onnx.export builds that module internally. optcc checks every artifact's outputs
    itself (export/emit.verify), so the guards add nothing. Private: torch.export._unlift."""
    _gate("no_guard_module", (2, 13), GUARDS_ISSUE)
    from torch.export import _unlift

    original = _unlift._ok_to_generate_guards_fn
    _unlift._ok_to_generate_guards_fn = lambda: False
    try:
        yield
    finally:
        _unlift._ok_to_generate_guards_fn = original


# the ONNX exporter documents the same flag for this (pytorch#155717)
SIZE_OBLIVIOUS_ISSUE = "https://github.com/pytorch/pytorch/issues/151582"


@contextlib.contextmanager
def size_oblivious_shapes() -> Iterator[None]:
    """Export without specialising dimensions whose example size is 0 or 1.

    Why: export specialises a dynamic dimension to the example's value when it is 0 or 1 (the
    "0/1 specialisation"); a cache slot with its own length (kv_share merge keeps a few exact
    tokens) is often that short in the example inputs. Private: torch.fx.experimental._config."""
    _gate("size_oblivious_shapes", (2, 13), SIZE_OBLIVIOUS_ISSUE)
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(backed_size_oblivious=True):
        yield


# The types of torch ops a graph node can call (ATen, torch.library, higher-order ops).
# Private module torch._ops; the classes are what fx node targets are.
OP_TYPES = (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)


def tree_leaves(tree: Any) -> list:
    """Leaves of a pytree (nested tuples, lists, dicts and HF ModelOutputs), as torch flattens them."""
    return _pytree.tree_leaves(tree)


# related upstream: move pytree logic out of generated code (no API to update specs)
SIGNATURE_ISSUE = "https://github.com/pytorch/pytorch/issues/58119"


def set_flat_signature(gm: fx.GraphModule) -> None:
    """Make an exported graph's calling convention match its current placeholders and outputs:
    forward(**{placeholder: tensor}) -> tuple of output leaves.

    Why: `ep.module()` flattens (args, kwargs) with the pytree specs recorded at export, and
    torch has no public API to update them after a pass adds or removes cache inputs and
    outputs. Private: Graph._codegen (a _PyTreeCodeGen) and its pytree_info."""
    _gate("set_flat_signature", (2, 13), SIGNATURE_ISSUE)
    cg = gm.graph._codegen
    if isinstance(cg, fx.graph._PyTreeCodeGen):
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        leaves = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        cg.pytree_info = cg.pytree_info._replace(
            orig_args=names, in_spec=_pytree.tree_structure(((), {k: 0 for k in names})),
            out_spec=_pytree.tree_structure(tuple(0 for _ in leaves)))
    gm.recompile()


NAMED_INPUTS_ISSUE = "https://github.com/pytorch/pytorch/issues/148713"


def forward_with_inputs(names: list[str], body: str) -> Any:
    """A `forward(self, <first>, <names...>)` function whose body calls `body` with the named
    inputs as (first, [rest...]): e.g. names ["input_ids", "past_key_0", ...] and body "self.run".

    Why: torch.export and torch.onnx name a graph's inputs after the parameters of forward (by
    inspect.signature), and reject *args/**kwargs forwards, so a decoder with one input per
    cache tensor needs a forward generated with those parameter names."""
    _gate("forward_with_inputs", (2, 13), NAMED_INPUTS_ISSUE)
    if not all(n.isidentifier() for n in names):
        raise ValueError(f"input names must be identifiers: {names}")
    first, rest = names[0], names[1:]
    ns: dict = {}
    exec(f"def forward(self, {', '.join(names)}):\n    return {body}({first}, [{', '.join(rest)}])\n", ns)  # noqa: S102
    return ns["forward"]


FAKE_MODE_ISSUE = "https://github.com/pytorch/pytorch/issues/113456"


def fake_mode_of(values: list) -> Any:
    """The FakeTensorMode of a graph's meta["val"] tensors, None if they are real tensors.
    Private: torch._guards.detect_fake_mode (no public equivalent; torch's own ONNX passes use it)."""
    _gate("fake_mode_of", (2, 13), FAKE_MODE_ISSUE)
    return torch._guards.detect_fake_mode(values)


# -------------------------------------------------------------- save (.pt2) ---

SERIALIZATION_ID_ISSUE = "https://github.com/pytorch/pytorch/issues/184219"


def pin_serialization_id(path: Path) -> None:
    """Make model.pt2 reproducible across machines: overwrite the zip record
    `.data/serialization_id` in place with digits derived from the other records' CRCs, and
    fix its CRC fields.

    Why: torch.export.save derives that id from the archive's file names taken from an
    unordered set, so the same program saves to different bytes on different machines; a lock
    must rebuild byte-identical artifacts anywhere, and torch.export.save has no option for a
    fixed id."""
    _gate("pin_serialization_id", (2, 13), SERIALIZATION_ID_ISSUE)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
    targets = [i for i in infos if i.filename.endswith(".data/serialization_id") and i.compress_type == zipfile.ZIP_STORED]
    digest = hashlib.sha256()
    for i in infos:
        if i not in targets:
            digest.update(i.filename.encode() + struct.pack("<I", i.CRC))
    for info in targets:
        off, size = info.header_offset, info.file_size
        name_len, extra_len = struct.unpack("<HH", data[off + 26: off + 30])
        start = off + 30 + name_len + extra_len
        new = str(int(digest.hexdigest(), 16)).rjust(size, "0")[:size].encode()
        data[start: start + size] = new
        crc = struct.pack("<I", zlib.crc32(new))
        data[off + 14: off + 18] = crc  # local header
        flags = struct.unpack("<H", data[off + 6: off + 8])[0]
        if flags & 0x8:  # data descriptor after the data, with or without its signature
            desc = start + size + (4 if data[start + size: start + size + 4] == b"PK\x07\x08" else 0)
            data[desc: desc + 4] = crc
        pos = data.find(b"PK\x01\x02")
        name = info.filename.encode()
        while pos >= 0:  # central directory entry
            n = struct.unpack("<H", data[pos + 28: pos + 30])[0]
            if data[pos + 46: pos + 46 + n] == name:
                data[pos + 16: pos + 20] = crc
            pos = data.find(b"PK\x01\x02", pos + 4)
    path.write_bytes(bytes(data))


# ---------------------------------------------------------- AOTInductor ---

AOTI_ISSUE = "https://pytorch.org/docs/stable/torch.compiler_aot_inductor.html"


def aoti_compile(ep: torch.export.ExportedProgram, path: Path, configs: dict) -> Path:
    """AOTInductor: compile an ExportedProgram into a self-contained .pt2 package.

    Why here: the documented entry point lives in the private torch._inductor namespace."""
    _gate("aoti_compile", (2, 13), AOTI_ISSUE)
    return Path(torch._inductor.aoti_compile_and_package(ep, package_path=str(path), inductor_configs=configs))


def aoti_load(path: Path) -> Any:
    """Load a package written by aoti_compile; the result is called like the module."""
    _gate("aoti_load", (2, 13), AOTI_ISSUE)
    return torch._inductor.aoti_load_package(str(path))


def cxx_compiler() -> str | None:
    """The path of the C++ compiler Inductor will call ($CXX, else its configured default), or
    None when there is none on PATH."""
    import os
    import shutil

    from torch._inductor import config

    names = [os.environ.get("CXX")] + list(config.cpp.cxx if isinstance(config.cpp.cxx, tuple) else [config.cpp.cxx])
    return next((shutil.which(n) for n in names if n and shutil.which(n)), None)


@functools.cache
def quantized_decomposed() -> Any:
    """torch.ops.quantized_decomposed: the quantize/dequantize ops whose patterns Inductor's x86
    lowering turns into oneDNN int8 kernels (qlinear) when freezing.

    Why: torch 2.13 registers them only when the private module below is imported (the PT2E
    quantizers that used to import it moved to torchao)."""
    _gate("quantized_decomposed", (2, 13), "https://github.com/pytorch/ao/issues/2259")
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the ops)

    return torch.ops.quantized_decomposed
