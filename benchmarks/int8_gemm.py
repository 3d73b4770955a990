"""One int8-dynamic linear on this CPU, every kernel optcc could use, interleaved:

    python benchmarks/int8_gemm.py [--m 1024 --k 384 --n 1536 --threads 2]

onnxruntime MatMulIntegerToFloat with uint8 activations and int8 weights (u8·s8,
what onnxruntime's own quantizer emits and optcc on VNNI CPUs), int8 weights kept to 7 bits
(u8·s7, optcc on x86 without VNNI: no int16 saturation) or uint8 weights (u8·u8),
the fp32 MatMul; torch._int_mm, the same int8 codes multiplied in fp32 (optcc's
fallback), the fp32 matmul; and onnxruntime's MatMulNBits with 8-bit weights in blocks of 32
along K (accuracy_level 4: activations quantized to int8 per block; 0: fp32 activations),
a fused alternative that quantizes on its own. Prints p50 ms (the timed calls run the kernel
alone) and each kernel's error against the exact integer product of its codes (u8·s8
saturates on CPUs without VNNI); MatMulNBits rows give their error against the fp32 product
instead, since they quantize differently."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.harness import graph_session  # noqa: E402
from optcc.measure.latency import measure  # noqa: E402


def _ort(nodes, inits, in_type, threads):
    """One-input ("x" of in_type) graph whose node writes "y"."""
    from onnx import helper as h

    return graph_session(nodes, [h.make_tensor_value_info("x", in_type, None)], inits, threads)


def _nbits8(w: np.ndarray, block: int, accuracy_level: int, threads: int):
    """MatMulNBits, bits=8: w [K, N] quantized per (output column, block of K) around zero point 128."""
    from onnx import TensorProto as T, helper as h, numpy_helper as nh

    k, n = w.shape
    wb = w.T.reshape(n, k // block, block)
    scale = np.maximum(np.abs(wb).max(-1), 1e-8) / 127.0
    codes = (np.round(wb / scale[..., None]).clip(-127, 127) + 128).astype(np.uint8)
    inits = [nh.from_array(codes, "b"), nh.from_array(scale.reshape(-1).astype(np.float32), "s"),
             nh.from_array(np.full(n * (k // block), 128, np.uint8), "z")]
    node = h.make_node("MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n, bits=8,
                       block_size=block, accuracy_level=accuracy_level)
    return _ort([node], inits, T.FLOAT, threads)


def main() -> None:
    from onnx import TensorProto as T, helper as h, numpy_helper as nh

    ap = argparse.ArgumentParser()
    for name, default in (("m", 1024), ("k", 384), ("n", 1536), ("threads", 2)):
        ap.add_argument(f"--{name}", type=int, default=default)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.m, a.k)).astype(np.float32)
    w = (rng.standard_normal((a.k, a.n)) * 0.05).astype(np.float32)
    xq = np.round(x / (np.abs(x).max(1, keepdims=True) / 127)).astype(np.int32)  # per-token codes
    ws = np.abs(w).max(0) / 127
    wq = np.round(w / ws).astype(np.int32)
    exact = (xq @ wq).astype(np.float64)
    wq7 = np.round(w / (np.abs(w).max(0) / 63)).astype(np.int32)  # 7-bit codes: their own exact product below
    one, za = nh.from_array(np.array(1.0, np.float32), "one"), nh.from_array(np.array(128, np.uint8), "za")
    scale = nh.from_array(ws.astype(np.float32), "ws")
    node = lambda ins: [h.make_node("MatMulIntegerToFloat", ins, ["y"], domain="com.microsoft")]
    u8s8 = _ort(node(["x", "b", "one", "ws", "za"]), [nh.from_array(wq.astype(np.int8), "b"), one, scale, za], T.UINT8, a.threads)
    u8s7 = _ort(node(["x", "b", "one", "ws", "za"]), [nh.from_array(wq7.astype(np.int8), "b"), one, scale, za], T.UINT8,
                a.threads)
    u8u8 = _ort(node(["x", "b", "one", "ws", "za", "zb"]), [nh.from_array((wq + 128).astype(np.uint8), "b"), one, scale, za,
                                                          nh.from_array(np.full(a.n, 128, np.uint8), "zb")], T.UINT8, a.threads)
    fp32 = _ort([h.make_node("MatMul", ["x", "w"], ["y"])], [nh.from_array(w, "w")], T.FLOAT, a.threads)
    xu8 = (xq + 128).astype(np.uint8)
    tq, twq, tx, tw = (torch.from_numpy(v) for v in (xq.astype(np.int8), wq.astype(np.int8), x, w))
    # name -> (timed call, output -> what to compare, (reference, label)); the timed calls do nothing
    # but the kernel: the ONNX int8 outputs carry the weight scales, undone only for the error.
    E, E7 = (exact, ""), ((xq @ wq7).astype(np.float64), " (vs its own int product)")
    F = (x.astype(np.float64) @ w, " (vs fp32)")
    rows = {
        "onnxruntime u8·s8 (quantize_dynamic's layout)": (lambda: u8s8.run(None, {"x": xu8})[0], lambda y: y / ws, E),
        "onnxruntime u8·s8, 7-bit weights (optcc without VNNI)": (lambda: u8s7.run(None, {"x": xu8})[0], lambda y: y / ws, E7),
        "onnxruntime u8·u8 (optcc on other CPUs)": (lambda: u8u8.run(None, {"x": xu8})[0], lambda y: y / ws, E),
        "onnxruntime fp32 MatMul": (lambda: fp32.run(None, {"x": x})[0], None, None),
        "torch._int_mm": (lambda: torch._int_mm(tq, twq).numpy(), np.asarray, E),
        "torch int8 codes in fp32 (optcc fallback)": (lambda: torch.mm(tq.float(), twq.float()).numpy(), np.asarray, E),
        "torch fp32 matmul": (lambda: torch.mm(tx, tw).numpy(), None, None),
    }
    for level in (4, 0):
        try:
            sess = _nbits8(w, 32, level, a.threads)
            rows[f"onnxruntime MatMulNBits 8-bit, block 32, accuracy_level {level}"] = (
                lambda s=sess: s.run(None, {"x": x})[0], np.asarray, F)
        except Exception as e:  # older onnxruntime: no 8-bit MatMulNBits on CPU
            print(f"MatMulNBits 8-bit, accuracy_level {level}: not available ({str(e).splitlines()[0][:120]})")
    res = measure({name: fn for name, (fn, _, _) in rows.items()}, warmup=2, iters=10, min_seconds=2.0, items=1)
    print(f"int8 linear {a.m}x{a.k} -> {a.n}, {a.threads} threads, torch {torch.__version__}")
    print("| kernel | p50 ms | rel. error vs its reference |\n|---|---|---|")
    for name, (fn, view, ref) in rows.items():
        if ref is None:
            err = "—"
        else:
            (r, what) = ref
            err = f"{np.abs(view(fn()) - r).max() / np.abs(r).max():.1e}{what}"
        print(f"| {name} | {res[name]['p50_ms']:.2f} | {err} |")


if __name__ == "__main__":
    main()
