"""onnxruntime CPU: residual Add + LayerNormalization, fused (SkipLayerNormalization) or not.

    python benchmarks/ort_layernorm.py [--threads 2] [--rows 1024] [--hidden 384]

Why optcc's emit runs residual LayerNorms on a 2-D view (optcc.export.emit.flatten_residual_layernorms):
onnxruntime fuses Add + bias Add + LayerNormalization over 3-D tensors into com.microsoft
SkipLayerNormalization, and on the CPU that kernel is slower than the ops it replaces.
Three one-op graphs on the same inputs, graph optimizations off, timed with optcc.measure.latency.measure:
  fused      SkipLayerNormalization(x, skip, gamma, beta, bias)
  unfused    Add(x, bias) → Add(·, skip) → LayerNormalization, on [batch, seq, hidden]
  optcc      the same unfused ops with the LayerNormalization on a [-1, hidden] Reshape
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from optcc.measure.latency import measure  # noqa: E402
from optcc.export.emit import ort_session  # noqa: E402


def session(kind: str, shape: tuple[int, int, int], threads: int, params: dict[str, np.ndarray]):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    hidden = shape[-1]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape)) for n in ("x", "skip", "y")]
    inits = [numpy_helper.from_array(v, k) for k, v in params.items()]
    opsets = [helper.make_opsetid("", 18)]
    if kind == "fused":
        nodes = [helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"], ["y"],
                                  domain="com.microsoft", epsilon=1e-12)]
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    else:
        nodes = [helper.make_node("Add", ["x", "bias"], ["xb"]), helper.make_node("Add", ["xb", "skip"], ["s"])]
        if kind == "optcc":
            inits += [numpy_helper.from_array(np.array([-1, hidden], np.int64), "to2d"),
                      numpy_helper.from_array(np.array(shape, np.int64), "to3d")]
            nodes += [helper.make_node("Reshape", ["s", "to2d"], ["s2"]),
                      helper.make_node("LayerNormalization", ["s2", "gamma", "beta"], ["y2"], axis=-1, epsilon=1e-12),
                      helper.make_node("Reshape", ["y2", "to3d"], ["y"])]
        else:
            nodes.append(helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12))
    model = helper.make_model(helper.make_graph(nodes, kind, io[:2], io[2:], inits), opset_imports=opsets)
    return ort_session(model.SerializeToString(), threads,
                       graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1024, help="batch x seq (MiniLM 8 x 128 = 1024)")
    ap.add_argument("--hidden", type=int, default=384)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    shape = (args.rows // 128 or 1, min(args.rows, 128), args.hidden)
    params = {k: rng.standard_normal(args.hidden).astype(np.float32) for k in ("gamma", "beta", "bias")}
    feed = {k: rng.standard_normal(shape).astype(np.float32) for k in ("x", "skip")}
    sessions = {k: session(k, shape, args.threads, params) for k in ("fused", "unfused", "optcc")}
    outs = {k: s.run(None, feed)[0] for k, s in sessions.items()}
    res = measure({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()},
                  warmup=10, iters=200, min_seconds=2.0, items=1)
    print(f"residual Add + LayerNorm on {list(shape)}, {args.threads} threads\n")
    print("| graph | p50 ms | p90 ms | max abs diff vs unfused |")
    print("|---|---|---|---|")
    for k, r in res.items():
        print(f"| {k} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {float(np.abs(outs[k] - outs['unfused']).max()):.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
