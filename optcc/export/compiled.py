"""The compiled torch artifact: the optimized graph compiled ahead of time by AOTInductor into
model.pt2, a package with a shared library for this CPU's instruction set, loaded without
recompiling. Freezing is on (weights become constants Inductor can prepack for oneDNN), the
dynamic dimensions of the capture stay dynamic (batch, sequence, cache lengths).

Before compiling, each optcc op node is replaced by its lowering (optcc/ops/lowering.py) so the
package calls no Python.
"""
from __future__ import annotations

import collections
import functools
import json
import time
import zipfile
from pathlib import Path
from typing import Callable

import torch
import torch.fx as fx

from optcc.compat import aoti_compile, aoti_load, cxx_compiler
from optcc.errors import ExportError
from optcc.graph.capture import capture, run_graph
from optcc.graph.fx import attr_at
from optcc.ops import COMPILE_LOWERINGS
from optcc.ops.quantized import cpu_flags

# emit.isa → Inductor's vector width for its own kernels (oneDNN picks its kernels at run time)
SIMDLEN = {"avx2": 256, "avx512": 512, "avx512_vnni": 512}
_ISA_FLAGS = {"AVX512": "avx512f", "AVX2": "avx2"}
VNNI = {"avx512_vnni", "amx_int8"}  # int8 dot products that accumulate in int32
MISSING_COMPILER = ("the compiled torch artifact (emit.formats: torch) needs a C++ compiler and none was found (g++ or $CXX)",
                    "install g++ (apt install g++; conda install gxx) or set $CXX, or emit exported or onnx instead")


def host_isa() -> tuple[str, str]:
    """(emit.isa, why) for `auto` on this CPU."""
    flags = cpu_flags()
    if flags & VNNI:
        return "avx512_vnni", "this CPU has int8 dot products (VNNI/AMX): oneDNN int8 GEMMs take full-range weights"
    if "avx512f" in flags:
        return "avx512", "this CPU has AVX-512 without VNNI"
    return "avx2", "this CPU has no AVX-512"


def resolve_emit(recipe) -> tuple[object, list[dict]]:
    """Before anything runs: stop when the compiled artifact is asked for and no compiler exists,
    and choose emit.isa for `auto` (the choice goes into the report and the lock)."""
    import dataclasses

    if "torch" not in recipe.emit.formats:
        return recipe, []
    if cxx_compiler() is None:
        raise ExportError(*MISSING_COMPILER)
    if recipe.emit.isa != "auto":
        return recipe, []
    isa, why = host_isa()
    return (dataclasses.replace(recipe, emit=dataclasses.replace(recipe.emit, isa=isa)),
            [{"step": 0, "pass": "emit", "option": "isa", "value": isa, "why": why}])


def lower_graph(gm: fx.GraphModule, vnni: bool) -> tuple[fx.GraphModule, dict[str, int]]:
    """A copy of `gm` whose optcc op nodes call their lowerings instead (optcc/ops/lowering.py);
    returns it and how many nodes took each kernel. `vnni`: the int8 kernels may use full-range
    weight codes."""
    from optcc.graph.capture import graph_snapshot

    gm = graph_snapshot(gm)
    kernels: collections.Counter = collections.Counter()
    owners: dict[int, fx.Node] = {}
    for node in list(gm.graph.nodes):
        lowering = COMPILE_LOWERINGS.get(node.target)
        if lowering is None:
            continue
        args = [attr_at(gm, a.target) if isinstance(a, fx.Node) and a.op == "get_attr" else a for a in node.args]
        for a, v in zip(node.args, args):
            if isinstance(v, torch.Tensor):
                owners[id(v)] = a
        fn, new_args, kernel = lowering(*args, vnni=vnni)
        with gm.graph.inserting_before(node):
            placed = tuple(_place(gm, node.name, i, a, owners) for i, a in enumerate(new_args))
            new = gm.graph.call_function(fn, placed)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        kernels[kernel] += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm, dict(kernels)


def _place(gm: fx.GraphModule, name: str, i: int, value, owners: dict[int, fx.Node]):
    """An argument of a lowered call: a tensor the graph already holds keeps its get_attr node; a
    new tensor becomes a buffer of `gm`."""
    if not isinstance(value, torch.Tensor):
        return value
    if id(value) in owners:
        return owners[id(value)]
    target = f"_lowered_{name}_{i}"
    gm.register_buffer(target, value)
    return gm.graph.get_attr(target)


def compile_package(gm: fx.GraphModule, inputs: dict[str, torch.Tensor], dynamic: bool, shapes: dict | None,
                    out: Path, isa: str = "auto") -> tuple[Path, dict]:
    """Lower, capture and compile `gm` into out/model.pt2; returns the path and what the report
    records (compile seconds, the instruction set the kernels were built for, the kernels the
    quantized linears took)."""
    compiler = cxx_compiler()
    if compiler is None:
        raise ExportError(*MISSING_COMPILER)
    path = out / "model.pt2"
    start = time.perf_counter()
    isa = host_isa()[0] if isa == "auto" else isa
    vnni = isa == "avx512_vnni"
    lowered, kernels = lower_graph(gm, vnni)
    ep = capture(lowered, inputs, dynamic, shapes)
    meta = {"optcc_torch": torch.__version__.split("+")[0]}
    if vnni and kernels.get("onednn-int8"):
        meta["optcc_needs"] = "vnni"  # full-range int8 weight codes: wrong on a CPU without VNNI
    try:
        with torch.no_grad():  # Inductor's int8 weight prepacking only runs on inference graphs
            aoti_compile(ep, path, {"freezing": True, "cpp.simdlen": SIMDLEN[isa], "aot_inductor.metadata": meta})
    except Exception as e:  # Inductor raises many types; the first line says which op or kernel
        raise ExportError(f"AOTInductor could not compile the graph: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                          "emit exported (the uncompiled program) or onnx instead, or run with --debug") from e
    return path, {"compile_s": round(time.perf_counter() - start, 2),
                  "compiled_for": package_metadata(path).get("AOTI_CPU_ISA") or None,
                  "compiler": Path(compiler).name, "linear_kernels": kernels}


def is_package(path: Path) -> bool:
    """True for an AOTInductor package, False for a torch.export archive (both are .pt2 zips)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/data/aotinductor/" in n for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def package_metadata(path: Path) -> dict:
    """The metadata AOTInductor stored with the compiled model (instruction set, optcc_torch)."""
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.endswith("wrapper_metadata.json")]
        return json.loads(z.read(names[0])) if names else {}


def check_loadable(path: Path) -> None:
    """Refuse, in one line, a package this process cannot run: built by a newer torch, or for an
    instruction set this CPU lacks."""
    meta = package_metadata(path)
    built = meta.get("optcc_torch")
    if built and torch.torch_version.TorchVersion(torch.__version__.split("+")[0]) < built:
        raise ExportError(f"{path.name} was compiled with torch {built}; this is torch {torch.__version__}",
                          f"install torch>={built}, or re-create the artifact here with optcc apply")
    isa = meta.get("AOTI_CPU_ISA", "")
    flags = cpu_flags()
    if flags and isa in _ISA_FLAGS and _ISA_FLAGS[isa] not in flags:
        raise ExportError(f"{path.name} was compiled for {isa} and this CPU has no {_ISA_FLAGS[isa]}",
                          "re-create it on this machine, or set emit.isa: avx2 in the recipe for a portable build")
    if flags and meta.get("optcc_needs") == "vnni" and not flags & VNNI:
        raise ExportError(f"{path.name} multiplies full-range int8 weights, which this CPU (no VNNI/AMX) cannot do exactly",
                          "re-create it on this machine, or set emit.isa: avx2 in the recipe for a portable build")


def load_package(path: Path) -> Callable[[dict[str, torch.Tensor]], list[torch.Tensor]]:
    check_loadable(path)
    try:
        model = aoti_load(path)
    except Exception as e:  # a C++ loader error
        raise ExportError(f"{path.name}: AOTInductor could not load the package: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                          "re-create it with optcc apply on this machine") from e
    return functools.partial(run_graph, model)
