"""Contenders and measurement shared by the workloads.

A contender is a name plus a zero-argument callable over fixed inputs; all of a
workload's contenders are timed together by optcc.measure.latency.measure (round-robin,
same inputs and threads, warm-up discarded, iteration and time floors).
"""
from __future__ import annotations

import contextlib
import io
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from optcc.measure.latency import measure
from optcc.graph.capture import flat_outputs
from optcc.graph.stats import flops


@dataclass
class Contender:
    name: str
    run: Callable[[dict], list[torch.Tensor]]  # inputs → flat outputs
    note: str = ""
    quality: dict = field(default_factory=dict)


def matmul_peak_gflops(threads: int, n: int = 1024, seconds: float = 1.0) -> float:
    """Measured fp32 GEMM throughput: the practical ceiling on this CPU and thread count."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - t0) / 1e9


def eager(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> Callable[[dict], list[torch.Tensor]]:
    m = model if dtype == torch.float32 else _cast(model, dtype)

    def run(inputs: dict) -> list[torch.Tensor]:
        with torch.no_grad():
            out = flat_outputs(m(**inputs))
        return [o.float() for o in out]

    return run


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).to(dtype)


def compiled(model: torch.nn.Module, inputs: dict, dtype: torch.dtype = torch.float32,
             freezing: bool = False) -> Optional[Callable[[dict], list[torch.Tensor]]]:
    """torch.compile (Inductor) of the model, cast to `dtype` first (the one-line bf16 recipe);
    `freezing` as PyTorch's CPU inference tuning guide recommends (weights become constants)."""
    from torch._inductor import config

    m = model if dtype == torch.float32 else _cast(model, dtype)
    try:
        with config.patch(freezing=freezing):
            c = torch.compile(m, dynamic=False)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                c(**inputs)
    except Exception as e:  # inductor needs a C++ compiler; report and skip
        print(f"  torch.compile unavailable: {type(e).__name__}: {str(e)[:120]}")
        return None

    def run(x: dict) -> list[torch.Tensor]:
        with torch.no_grad(), config.patch(freezing=freezing):
            return [o.float() for o in flat_outputs(c(**x))]

    return run


def openvino(model: torch.nn.Module, inputs: dict, threads: int, precision: str,
             calibration: Optional[list[dict]] = None) -> Optional[Callable[[dict], list[torch.Tensor]]]:
    """OpenVINO as its docs set it up for latency: openvino.convert_model straight from the torch
    model, compile_model on CPU with PERFORMANCE_HINT LATENCY, the threads given, and
    INFERENCE_PRECISION_HINT f32 or bf16 (bf16 only where the CPU has it: OpenVINO falls back to
    f32 otherwise). precision "int8": NNCF post-training quantization (model_type TRANSFORMER) on
    `calibration` batches first. None when openvino (or nncf) is not installed: pip install
    openvino nncf."""
    try:
        import openvino as ov
    except ImportError:
        print("  openvino not installed (pip install openvino nncf): OpenVINO contenders left out")
        return None
    names = list(inputs)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        ov_model = ov.convert_model(model, example_input=dict(inputs))
        if precision == "int8":
            try:
                import nncf
            except ImportError:
                print("  nncf not installed (pip install nncf): OpenVINO int8 left out")
                return None
            data = nncf.Dataset(calibration or [inputs], lambda b: {k: b[k].numpy() for k in names})
            ov_model = nncf.quantize(ov_model, data, model_type=nncf.ModelType.TRANSFORMER,
                                     subset_size=len(calibration or [inputs]))
    hint = {"f32": "f32", "bf16": "bf16", "int8": "f32"}[precision]
    cm = ov.Core().compile_model(ov_model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                                                    "INFERENCE_PRECISION_HINT": hint})
    request = cm.create_infer_request()

    def run(x: dict) -> list[torch.Tensor]:
        res = request.infer({k: x[k].numpy() for k in names})
        return [torch.from_numpy(res[o].copy()) for o in cm.outputs]

    return run


def torch_dynamic_int8(model: torch.nn.Module) -> Optional[Callable[[dict], list[torch.Tensor]]]:
    try:
        from torch.ao.quantization import quantize_dynamic

        q = quantize_dynamic(_cast(model, torch.float32), {torch.nn.Linear}, dtype=torch.qint8)
    except Exception as e:
        print(f"  torch.ao dynamic int8 unavailable: {e}")
        return None
    return eager(q)


def plain_onnx(model: torch.nn.Module, inputs: dict, folder: Path, quantize: bool, threads: int):
    """What a user gets without optcc: torch.onnx.export (dynamo) of the eager model, optionally
    through onnxruntime.quantization.quantize_dynamic (the path Optimum's ORTQuantizer takes)."""
    from optcc.export.emit import load_onnx

    path = folder / "plain.onnx"
    if not path.exists():
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(model, (), dict(inputs), strict=False)
            torch.onnx.export(ep, (), kwargs=dict(inputs), dynamo=True, optimize=True).save(str(path))
    if not quantize:
        return load_onnx(path, threads)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    qpath = folder / "plain.int8.onnx"
    if not qpath.exists():
        quantize_dynamic(str(path), str(qpath), weight_type=QuantType.QInt8)
    return load_onnx(qpath, threads)


def optcc_artifacts(recipe: Path, model: Optional[str], folder: Path, threads: int,
                    inputs: Optional[dict] = None) -> dict:
    """Run an optcc recipe (bench off: timing happens here, with everyone else; model.inputs
    overridden to the workload's shape) and load its artifacts."""
    import yaml

    from optcc.api import apply
    from optcc.export.emit import load_artifact

    data = yaml.safe_load(recipe.read_text())
    data["bench"] = {"enabled": False}
    data.pop("require", None)
    data.pop("evaluate", None)  # quality is measured by the workload itself, on every contender alike
    if inputs:
        data.setdefault("model", {})["inputs"] = {**data.get("model", {}).get("inputs", {}), **inputs}
    tmp_recipe = folder / f"{recipe.stem}.yaml"
    tmp_recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    out = folder / f"optcc-{recipe.stem}"
    report = apply(tmp_recipe, model, out)
    runners = {}
    for a in report["artifacts"]:
        p = Path(a["path"])
        try:
            runners[a["format"]] = load_artifact(p, threads)
        except Exception as e:  # one artifact that does not load must not take the workload down
            print(f"  optcc {recipe.stem}: {p.name} does not load in this process, left out: {type(e).__name__}: {str(e)[:160]}")
    from optcc.intake.decoder import CacheSpec

    meta = out / "decoder.json"  # decoders: the artifacts' own cache layout (a pass may have changed it)
    cache = CacheSpec.read(meta) if meta.exists() else None
    return {"runners": runners, "report": report, "cache": cache}


def time_all(contenders: list[Contender], inputs: dict, quick: bool, items: int) -> dict[str, dict]:
    fns = {c.name: (lambda c=c: c.run(inputs)) for c in contenders}
    if quick:
        return measure(fns, warmup=1, iters=2, min_seconds=0.0, items=items)
    return measure(fns, warmup=3, iters=10, min_seconds=3.0, items=items, max_seconds=600)


def count_flops(model: torch.nn.Module, inputs: dict) -> int:
    return flops(model, inputs)


def graph_session(nodes: list, inputs: list, inits: list, threads: int):
    """An onnxruntime CPU session of a graph of onnx.helper nodes (default and com.microsoft
    domains): the given inputs (value infos) and initializers, every node's first output a float
    graph output. For kernel micro-benchmarks."""
    from onnx import TensorProto, helper

    from optcc.export.emit import ort_session

    outs = [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes]
    model = helper.make_model(helper.make_graph(nodes, "bench", inputs, outs, inits),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    return ort_session(model.SerializeToString(), threads)


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="optcc-bench-"))


def held_out_windows(seq: int, n: int) -> torch.Tensor:
    """The first n full windows [n, seq + 1] of the reference LM's held-out bytes."""
    from optcc.zoo import data as zoo

    ids = zoo.byte_encode(zoo.load_text_split("byte-llama", "eval"))
    return torch.stack([w for w in zoo.lm_windows(ids, seq) if w.numel() == seq + 1][:n])


def genai_decoder(model: torch.nn.Module, folder: Path, precision: str, threads: int):
    """onnxruntime-genai as its docs set it up: its model builder (`python -m
    onnxruntime_genai.models.builder -i HF_FOLDER -p int4|fp32 -e cpu`: GroupQueryAttention with
    rotary, MatMulNBits, SkipSimplifiedLayerNormalization) on the HF model saved to a folder, then
    its own generation loop, greedy. intra_op_num_threads is set in genai_config.json, where its
    docs put session options. -> generate(prompt [1, T], new_tokens) -> (tokens [1, new],
    timings as optcc.intake.decoder.generate reports them), or None when onnxruntime-genai is
    not installed (pip install ".[bench]")."""
    import json
    import subprocess
    import sys

    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    hf = folder / "hf"
    if not hf.exists():
        _save_hf_folder(model, hf)
    out = folder / f"genai-{precision}"
    if not (out / "genai_config.json").exists():
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", precision,
               "-e", "cpu", "-c", str(folder / "genai-cache")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"onnxruntime-genai builder failed: {done.stderr.strip().splitlines()[-1:]}")
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=4))
    og_model = og.Model(str(out))
    kv_bytes = genai_kv_bytes(cfg)

    def generate(prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, dict]:
        params = og.GeneratorParams(og_model)
        params.set_search_options(do_sample=False, max_length=int(prompt.shape[1]) + new_tokens,
                                  min_length=int(prompt.shape[1]) + new_tokens)  # no early stop at eos: every contender makes new_tokens
        gen = og.Generator(og_model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt.numpy().astype("int32"))  # runs the prefill: the first token's logits
        gen.generate_next_token()  # picks the first token from them (the model runs again on the next call)
        token = int(gen.get_next_tokens()[0])
        t1 = time.perf_counter()
        tokens, steps = [token], []
        for _ in range(new_tokens - 1):
            s0 = time.perf_counter()
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
            steps.append(time.perf_counter() - s0)
        return torch.tensor([tokens]), {"prefill_s": t1 - t0, "decode_s": steps, "kv_bytes_per_token": kv_bytes}

    return generate


def genai_kv_bytes(cfg: dict) -> int:
    """KV-cache bytes per token of an onnxruntime-genai build, from its genai_config.json (fp32 cache on CPU)."""
    dec = cfg["model"]["decoder"]
    return 2 * dec["num_hidden_layers"] * dec["num_key_value_heads"] * dec["head_size"] * 4


def _save_hf_folder(model: torch.nn.Module, folder: Path) -> None:
    """A transformers model as a local HF folder the builder reads: weights, config, and a word-level
    tokenizer over the model's vocabulary (the builder copies a tokenizer; generation here feeds ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(folder)
    n = model.config.vocab_size
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(n)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2").save_pretrained(folder)
