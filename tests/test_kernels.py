"""optcc/ops/kernels: every Triton kernel against its torch reference, and the custom ops' CPU path.

Triton on CPU: the kernels run under TRITON_INTERPRET=1 in ONE child process
(`python tests/test_kernels.py OUT`). The mode has to be on before triton is
first imported (triton.language builds its own jit helpers such as tl.zeros at
import), and in a pytest session triton is already imported: `import optcc`
pulls it in through torch. The child builds every case's inputs, runs the kernel
and saves inputs and outputs; the tests here compute the references in this
process and compare case by case.

GPU: the same cases, plus larger ones and the ops' CUDA dispatch, run the
compiled kernels when torch.cuda.is_available(), and skip otherwise.

Tolerances (fp32 kernels use tl.dot "ieee", so only the summation order differs):
- int4 matmul fp32: atol 1e-4, rtol 1e-5 (|y| ≲ 50, K ≤ 256; seen: ≤ 1.6e-5).
- int4 matmul fp16: the kernel rounds the dequantized weight to fp16 before the
  dot, the reference keeps it fp32; both round y to fp16 (one ulp is 1.6e-2 at
  |y| = 32): atol 1e-2, rtol 2e-3 (seen: 1.6e-2 at |y| ≈ 32).
- ToMe scores (node_max): atol 1e-5, rtol 1e-5 (seen: ≤ 1.2e-7); partner indices
  and the whole Match (src, dst, keep, ok): exactly equal.
- ToMe merge: atol 1e-5, rtol 1e-5 (seen: exact); rows nothing merged into: bitwise copies.

The interpreter computes tl.argmax with numpy, whichever tie_break_left says, so
the lowest-index tie rule inside a tile is only checked on a GPU ("match-exact-ties");
across B tiles it is the kernel's own strict `>` and is checked here too.
"""
import importlib
import inspect
import os
import subprocess
import sys
import traceback

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
import optcc.ops.kernels as kernels
from optcc.algorithms import tome as M
from optcc.algorithms import quantizers

im = importlib.import_module("optcc.ops.kernels.int4_matmul")  # optcc.ops.kernels.int4_matmul is the function
tome = importlib.import_module("optcc.ops.kernels.tome_triton")

TOL_FP32 = dict(atol=1e-4, rtol=1e-5)
TOL_FP16 = dict(atol=1e-2, rtol=2e-3)
TOL_TOME = dict(atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ cases ---
# Each builder returns plain data (tensors, ints, tuples, None) so the child can torch.save it.

def _int4(lead, n, k, group, *, zeros=True, bias=True, dtype=torch.float32, flat=False, strided=False, seed=0):
    """Weights quantized by the quantize pass's own math (quantizers.quantize_groupwise), x: [*lead, K]."""
    gen = torch.Generator().manual_seed(seed)
    codes, scale, zero = quantizers.quantize_groupwise(torch.randn(n, k, generator=gen), group)
    packed = quantizers.pack_int4(codes)  # [N, K/2]
    x = torch.randn(k, *lead, generator=gen).t() if strided else torch.randn(*lead, k, generator=gen)
    return {"x": x.to(dtype),
            "qweight": packed if flat else packed.reshape(n, k // group, group // 2),
            "scales": scale if flat else scale.reshape(-1),
            "zeros": quantizers.pack_zero_points(zero) if zeros else None,
            "bias": torch.randn(n, generator=gen).to(dtype) if bias else None,
            "group_size": group}


def _linear_w4(lead, n, k, group, accuracy_level, seed=0):
    """The exact argument list passes/quantize.py emits for optcc::linear_w4."""
    d = _int4(lead, n, k, group, seed=seed)
    return {"args": (d["x"], d["qweight"], d["scales"], d["zeros"], d["bias"], k, group, accuracy_level)}


def _padding(b, t, pads):
    valid = torch.ones(b, t, dtype=torch.bool)
    for i, p in enumerate(pads):
        if p:
            valid[i, -p:] = False
    return valid


def _match(b, t, d, *, protected=(), pads=None, r=1, one_hot=0, seed=0):
    """metric [B, T, D] L2-normalised; one_hot=n: token i is e_(i mod n), so scores are exactly 0 or 1 (ties)."""
    gen = torch.Generator().manual_seed(seed)
    if one_hot:
        metric = F.one_hot(torch.arange(t) % one_hot, d).float().expand(b, -1, -1).contiguous()
    else:
        metric = F.normalize(torch.randn(b, t, d, generator=gen), dim=-1)
    return {"metric": metric, "protected": tuple(protected), "valid": _padding(b, t, pads) if pads else None, "r": r}


def _merge_from_matching(b, t, c, *, protected=(), pads=None, r=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = _match(b, t, 16, protected=protected, pads=pads, r=r, seed=seed)
    match = M.bipartite_soft_matching(m["metric"], r, protected, m["valid"])
    return {"x": torch.randn(b, t, c, generator=gen), "size": 1.0 + 2.0 * torch.rand(b, t, 1, generator=gen),
            "match": tuple(match)}


def _merge_by_hand(t, c, src, dst, ok, seed=0):
    """Hand-written Match: several sources into one destination, dropped (ok = 0) sources."""
    gen = torch.Generator().manual_seed(seed)
    src, dst = torch.tensor(src, dtype=torch.int64), torch.tensor(dst, dtype=torch.int64)
    b = src.shape[0]
    match = (src, dst, M._keep_from_src(src, t), torch.tensor(ok, dtype=torch.float32))
    return {"x": torch.randn(b, t, c, generator=gen), "size": 1.0 + 2.0 * torch.rand(b, t, 1, generator=gen),
            "match": match}


def _merge_many(t, c, r, seed=0):
    """r > 64: the kernel walks the sources in several BLOCK_R tiles."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.arange(0, 2 * r, 2).unsqueeze(0)
    dst = (2 * torch.randint(0, t // 2, (1, r), generator=gen) + 1)
    match = (src, dst, M._keep_from_src(src, t), torch.ones(1, r))
    return {"x": torch.randn(1, t, c, generator=gen), "size": 1.0 + 2.0 * torch.rand(1, t, 1, generator=gen),
            "match": match}


CASES = {  # name: (kind, builder)
    # N=48 < BLOCK_N, M=1 (decode)
    "int4-m1": ("int4", lambda: _int4((1,), 48, 64, 32)),
    # odd M, N=70 spans two BLOCK_N tiles, 3 groups: packed zero points carry a pad nibble
    "int4-odd-m-odd-groups": ("int4", lambda: _int4((7,), 70, 96, 32)),
    # zeros None: MatMulNBits' default zero point 8
    "int4-default-zero": ("int4", lambda: _int4((5,), 16, 64, 16, zeros=False)),
    # flat layouts qweight [N, K/2], scales [N, groups]; no bias
    "int4-flat-no-bias": ("int4", lambda: _int4((4,), 24, 128, 64, bias=False, flat=True)),
    # x [3, 11, K]: M=33 takes BLOCK_M 64; one group over all of K
    "int4-batched-m33": ("int4", lambda: _int4((3, 11), 40, 128, 128)),
    # 16 groups of 16: several groups (and both zero nibbles) inside one BLOCK_P step, 4 K steps
    "int4-many-groups": ("int4", lambda: _int4((2,), 20, 256, 16, zeros=True)),
    # smallest group, K < one BLOCK_P step
    "int4-group2": ("int4", lambda: _int4((3,), 5, 8, 2)),
    # x is a transposed view: strides (1, M)
    "int4-strided-x": ("int4", lambda: _int4((6,), 32, 64, 32, strided=True)),
    # half inputs: the non-ieee tl.dot branch
    "int4-fp16": ("int4", lambda: _int4((9,), 64, 128, 32, dtype=torch.float16)),
    # the CUDA kernel attached to optcc::linear_w4, called with the pass's 8 arguments
    "linear_w4": ("linear_w4", lambda: _linear_w4((2, 5), 24, 64, 32, accuracy_level=4)),
    # odd T: one more A token than B tokens; single tile
    "match-odd-tokens": ("match", lambda: _match(1, 9, 8, r=3)),
    # batch 3, CLS protected, different padding per row; r large enough to force padded pairs (ok = 0)
    "match-protected-padding": ("match", lambda: _match(3, 50, 24, protected=(0,), pads=(7, 0, 20), r=20)),
    # 35 A rows x 35 B columns: two tiles each way; protected on both sides
    "match-multi-tile": ("match", lambda: _match(2, 70, 64, protected=(0, 1, 5), pads=(0, 3), r=30)),
    # exact ties (scores 0 or 1), equal partners in both B tiles: lowest index must win
    "match-exact-ties": ("match", lambda: _match(2, 80, 16, one_hot=5, r=10)),
    # protected indices outside 0..T-1 protect nothing (as merge._index_mask)
    "match-protected-out-of-range": ("match", lambda: _match(1, 12, 8, protected=(-1, 3, 999), r=4)),
    # batch 3 from a real matching: shared destinations and dropped padded pairs; C=40 masks a tile
    "merge-from-matching": ("merge", lambda: _merge_from_matching(3, 50, 40, protected=(0,), pads=(7, 0, 20), r=20)),
    # C=300: two column tiles; three sources into token 3; ok = 0 entries
    "merge-shared-dst": ("merge", lambda: _merge_by_hand(12, 300, [[0, 2, 4, 6], [2, 4, 8, 10]],
                                                         [[1, 1, 5, 7], [3, 3, 3, 11]],
                                                         [[1, 1, 0, 1], [1, 0, 1, 1]])),
    "merge-r-over-64": ("merge", lambda: _merge_many(150, 16, 70)),
    "merge-r0": ("merge", lambda: _merge_by_hand(6, 8, [[], []], [[], []], [[], []])),
}


def run_kernel(kind: str, case: dict):
    """The Triton side of a case (interpreted on CPU tensors, compiled on CUDA tensors)."""
    if kind == "int4":
        return (im.int4_matmul_triton(case["x"], case["qweight"], case["scales"], case["zeros"],
                                      case["group_size"], case["bias"]),)
    if kind == "linear_w4":
        return (kernels._linear_w4_cuda(*case["args"]),)
    if kind == "match":
        node_max, node_idx = tome.match_scores_triton(case["metric"], case["protected"], case["valid"])
        match = tome.bipartite_match(case["metric"], case["r"], case["protected"], case["valid"], backend="triton")
        return (node_max, node_idx, *match)
    if kind == "merge":
        return tome.merge_triton(case["x"], case["size"], M.Match(*case["match"]))
    raise ValueError(kind)


def run_reference(kind: str, case: dict):
    if kind == "int4":
        return (im.int4_matmul_reference(case["x"], case["qweight"], case["scales"], case["zeros"],
                                         case["group_size"], case["bias"]),)
    if kind == "linear_w4":
        return (torch.ops.optcc.linear_w4(*case["args"]),)
    if kind == "match":
        node_max, node_idx = tome.match_scores_reference(case["metric"], case["protected"], case["valid"])
        match = M.bipartite_soft_matching(case["metric"], case["r"], case["protected"], case["valid"])
        return (node_max, node_idx, *match)
    if kind == "merge":
        return M.merge_wavg(case["x"], case["size"], M.Match(*case["match"]))
    raise ValueError(kind)


def check(kind: str, case: dict, got, want) -> None:
    """Numbers, per kind, with the tolerances in the module docstring."""
    got = [g.cpu() if isinstance(g, torch.Tensor) else g for g in got]
    if kind in ("int4", "linear_w4"):
        x = case["x"] if kind == "int4" else case["args"][0]
        assert got[0].shape == want[0].shape and got[0].dtype == want[0].dtype
        torch.testing.assert_close(got[0], want[0], **(TOL_FP32 if x.dtype == torch.float32 else TOL_FP16))
    elif kind == "match":
        torch.testing.assert_close(got[0], want[0], **TOL_TOME)  # -inf rows (protected) compare equal
        assert torch.equal(got[1], want[1]), "partner indices differ"
        for name, g, w in zip(M.Match._fields, got[2:], want[2:]):
            assert torch.equal(g, w), f"Match.{name} differs"
    elif kind == "merge":
        for g, w in zip(got, want):
            assert g.shape == w.shape
            torch.testing.assert_close(g, w, **TOL_TOME)
        src, dst, keep, ok = case["match"]
        x = case["x"]
        for bi in range(x.shape[0]):
            for i, t in enumerate(keep[bi].tolist()):
                if t not in dst[bi].tolist():
                    assert torch.equal(got[0][bi, i], x[bi, t]), f"row {t} (nothing merged into it) is not a copy"


# ------------------------------------------------ Triton, interpreted on CPU ---

def _child(out_path: str) -> None:
    """Runs in the child process with TRITON_INTERPRET=1 (see the module docstring)."""
    from triton import knobs

    if not knobs.runtime.interpret or type(im._kernel()).__name__ != "InterpretedFunction":
        raise SystemExit("TRITON_INTERPRET=1 is not in effect")
    results = {}
    for name, (kind, build) in CASES.items():
        case = build()
        try:
            out, error = tuple(run_kernel(kind, case)), None
        except Exception:
            out, error = None, traceback.format_exc()
        results[name] = {"inputs": case, "out": out, "error": error}
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("triton-interpret") / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, __file__, str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    if p.returncode != 0:
        pytest.fail(f"interpreter child failed (rc {p.returncode}):\n{p.stderr[-4000:]}")
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreted_matches_reference(interpreted, name):
    kind = CASES[name][0]
    res = interpreted[name]
    if res["error"]:
        pytest.fail(f"{name}: the kernel raised under TRITON_INTERPRET=1:\n{res['error']}")
    check(kind, res["inputs"], res["out"], run_reference(kind, res["inputs"]))


# ------------------------------------------------------ references, CPU ops ---

def test_int4_reference_reads_the_quantizer_layout():
    """The reference must agree with quant's own dequantizer (codes - zero) * scale, and zeros None means 8."""
    gen = torch.Generator().manual_seed(1)
    codes, scale, zero = quantizers.quantize_groupwise(torch.randn(12, 96, generator=gen), 32)  # 3 groups: odd
    x, bias = torch.randn(5, 96, generator=gen), torch.randn(12, generator=gen)
    packed = quantizers.pack_int4(codes).reshape(12, 3, 16)
    want = x @ quantizers.dequantize_groupwise(codes, scale, zero).t() + bias
    got = im.int4_matmul_reference(x, packed, scale.reshape(-1), quantizers.pack_zero_points(zero), 32, bias)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    eight = torch.full_like(zero, 8)
    want8 = x @ quantizers.dequantize_groupwise(codes, scale, eight).t()
    torch.testing.assert_close(im.int4_matmul_reference(x, packed, scale, None, 32), want8, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad, message", [(3, "must be even"), (48, "divide K=64"), (0, "must be even")])
def test_int4_rejects_bad_group_size(bad, message):
    d = _int4((2,), 4, 64, 32)
    with pytest.raises(ValueError, match=message):
        im.int4_matmul_reference(d["x"], d["qweight"], d["scales"], d["zeros"], bad)


def test_int4_matmul_op_cpu_is_the_reference():
    d = _int4((2, 3), 24, 64, 32)
    args = (d["x"], d["qweight"], d["scales"], d["zeros"], d["bias"], d["group_size"])
    y = torch.ops.optcc.int4_matmul(*args)
    assert torch.equal(y, im.int4_matmul_reference(d["x"], d["qweight"], d["scales"], d["zeros"], 32, d["bias"]))
    assert torch.equal(kernels.int4_matmul(d["x"], d["qweight"], d["scales"], d["zeros"], 32, d["bias"]), y)
    with pytest.raises(ValueError, match="backend"):
        kernels.int4_matmul(d["x"], d["qweight"], d["scales"], d["zeros"], 32, backend="cuda")


def test_linear_w4_cpu_agrees_with_int4_reference():
    """optcc::linear_w4 (quantize pass) and the int4 kernels read one layout."""
    x, w, s, z, b, k, g, level = _linear_w4((2, 5), 24, 64, 32, accuracy_level=0)["args"]
    torch.testing.assert_close(torch.ops.optcc.linear_w4(x, w, s, z, b, k, g, level),
                               im.int4_matmul_reference(x, w, s, z, g, b), atol=1e-5, rtol=1e-5)


def test_tome_match_op_cpu_is_the_reference():
    c = _match(3, 50, 24, protected=(0,), pads=(7, 0, 20))
    got = torch.ops.optcc.tome_match(c["metric"], list(c["protected"]), c["valid"])
    want = tome.match_scores_reference(c["metric"], c["protected"], c["valid"])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("name", [n for n, (kind, _) in CASES.items() if kind == "match"])
def test_tome_reference_reproduces_merge_module(name):
    """match_scores_reference + match_from_scores is merge.bipartite_soft_matching, split in two."""
    c = CASES[name][1]()
    node_max, node_idx = tome.match_scores_reference(c["metric"], c["protected"], c["valid"])
    got = tome.match_from_scores(node_max, node_idx, c["r"], c["metric"].shape[1])
    want = M.bipartite_soft_matching(c["metric"], c["r"], c["protected"], c["valid"])
    for name_, g, w in zip(M.Match._fields, got, want):
        assert torch.equal(g, w), f"Match.{name_} differs"


def test_tome_dispatchers_use_merge_module_on_cpu():
    c = _merge_from_matching(2, 20, 8, r=5)
    m = M.Match(*c["match"])
    got, want = tome.merge(c["x"], c["size"], m), M.merge_wavg(c["x"], c["size"], m)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    with pytest.raises(ValueError, match="backend"):
        tome.merge(c["x"], c["size"], m, backend="gpu")


def test_ops_fake_kernels():
    """register_fake gives the real kernel's shapes and dtypes (torch.library.opcheck)."""
    d = _int4((3,), 24, 64, 32)
    torch.library.opcheck(torch.ops.optcc.int4_matmul.default,
                          (d["x"], d["qweight"], d["scales"], d["zeros"], d["bias"], 32),
                          test_utils=("test_schema", "test_faketensor"))
    c = _match(2, 9, 8, pads=(2, 0))
    torch.library.opcheck(torch.ops.optcc.tome_match.default, (c["metric"], [0], c["valid"]),
                          test_utils=("test_schema", "test_faketensor"))


def test_ops_inside_torch_export_with_dynamic_batch():
    d = _int4((2, 5), 24, 64, 32)
    w = {k: d[k] for k in ("qweight", "scales", "zeros", "bias")}

    class Both(torch.nn.Module):
        def forward(self, x, metric, valid):
            y = torch.ops.optcc.int4_matmul(x, w["qweight"], w["scales"], w["zeros"], w["bias"], 32)
            node_max, node_idx = torch.ops.optcc.tome_match(metric, [0], valid)
            return y, node_max, node_idx

    c = _match(2, 9, 8, pads=(2, 0))
    batch = torch.export.Dim("batch", min=1)
    ep = torch.export.export(Both(), (d["x"], c["metric"], c["valid"]),
                             dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    targets = {n.target: n for n in ep.graph.nodes if n.op == "call_function"}
    y_val = targets[torch.ops.optcc.int4_matmul.default].meta["val"]
    assert isinstance(y_val.shape[0], torch.SymInt)  # the batch stayed dynamic through the fake kernel
    assert tuple(y_val.shape[1:]) == (5, 24)
    tm_val = targets[torch.ops.optcc.tome_match.default].meta["val"]
    assert tuple(tm_val[0].shape[1:]) == (5,) and tm_val[1].dtype == torch.int64

    d4, c4 = _int4((4, 5), 24, 64, 32, seed=3), _match(4, 9, 8, pads=(0, 1, 2, 3), seed=3)
    y, node_max, node_idx = ep.module()(d4["x"], c4["metric"], c4["valid"])
    assert torch.equal(y, im.int4_matmul_reference(d4["x"], w["qweight"], w["scales"], w["zeros"], 32, w["bias"]))
    want = tome.match_scores_reference(c4["metric"], [0], c4["valid"])
    assert torch.equal(node_max, want[0]) and torch.equal(node_idx, want[1])


def test_linear_w4_has_cuda_kernel_with_full_signature():
    """The dispatcher calls the CUDA kernel with every schema argument (it lacked accuracy_level once)."""
    assert kernels.LINEAR_W4_CUDA
    assert torch._C._dispatch_has_kernel_for_dispatch_key("optcc::linear_w4", "CUDA")
    schema = [a.name for a in torch.ops.optcc.linear_w4.default._schema.arguments]
    assert list(inspect.signature(kernels._linear_w4_cuda).parameters) == schema


# ------------------------------------------------------- compiled, on a GPU ---

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


GPU_CASES = {
    **CASES,
    "int4-gpu-prefill-fp32": ("int4", lambda: _int4((300,), 512, 1024, 128)),
    "int4-gpu-prefill-fp16": ("int4", lambda: _int4((300,), 512, 1024, 128, dtype=torch.float16)),
    "int4-gpu-decode-bf16": ("int4", lambda: _int4((1,), 4096, 4096, 128, dtype=torch.bfloat16)),
    "match-gpu-vit": ("match", lambda: _match(8, 197, 64, protected=(0,), r=16)),
    "merge-gpu-vit": ("merge", lambda: _merge_from_matching(8, 197, 768, protected=(0,), r=16)),
}


def _rel_err(got, want):
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))


@cuda
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_triton_cuda_matches_reference(name):
    pytest.importorskip("triton")
    kind, build = GPU_CASES[name]
    case = build()
    got = run_kernel(kind, _to(case, "cuda"))
    want = run_reference(kind, case)
    if name.startswith("int4-gpu"):  # large K: judge by relative error norm, fp32 tight, halves by their precision
        limit = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[case["x"].dtype]
        assert _rel_err(got[0].cpu(), want[0]) < limit
    else:
        check(kind, case, got, want)


@cuda
def test_custom_ops_dispatch_to_triton_on_cuda():
    pytest.importorskip("triton")
    d = _to(_int4((3, 7), 96, 256, 64, dtype=torch.float16), "cuda")
    args = (d["x"], d["qweight"], d["scales"], d["zeros"], d["bias"], 64)
    triton_y = im.int4_matmul_triton(d["x"], d["qweight"], d["scales"], d["zeros"], 64, d["bias"])
    assert torch.equal(torch.ops.optcc.int4_matmul(*args), triton_y)
    x, w, s, z, b, k, g, lvl = _to(_linear_w4((4,), 64, 128, 32, accuracy_level=0), "cuda")["args"]
    assert torch.equal(torch.ops.optcc.linear_w4(x, w, s, z, b, k, g, lvl), im.int4_matmul_triton(x, w, s, z, g, b))
    c = _to(_match(2, 70, 64, protected=(0,), pads=(0, 3)), "cuda")
    got = torch.ops.optcc.tome_match(c["metric"], [0], c["valid"])
    want = tome.match_scores_triton(c["metric"], [0], c["valid"])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


if __name__ == "__main__":
    _child(sys.argv[1])
