"""Where a decoder's time goes at decode in onnxruntime: kernel time per op type per generated
token, for the plain export through quantize_dynamic and for optcc's artifacts, side by side.

    python benchmarks/decode_profile.py [--model builtin:llama-100m] [--prompt 128] [--steps 32]
        [--recipes recipes/generate.yaml,recipes/llama-int8-kv.yaml] [--genai] [--threads 2] [--json out.json]

Each model prefills the same prompt (not profiled), then decodes `steps` tokens greedily with
onnxruntime's profiler on. Per token: the wall time of a step as optcc's generation loop sees
it, the kernel time summed over ops, and the rest (onnxruntime's own overhead plus the loop's
feeds and copies). Then the op types by kernel time per token. Random-weight models are fine:
this is about where time goes, not what is generated. --genai adds onnxruntime-genai's int4
build (its model builder, as W3 sets it up), profiled through its own session options in its
own loop; its "step" is the time of a generate_next_token call.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable, as `python -m` would
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def profile_decode(path: Path, spec, prompt, steps: int, threads: int) -> dict:
    """Prefill with a plain session, then decode `steps` tokens with a profiling one -> per-token figures."""
    import torch

    from optcc.export.emit import ort_session
    from optcc.intake.decoder import generate

    plain = ort_session(path, threads)
    prof = ort_session(path, threads, enable_profiling=True,
                       profile_file_prefix=str(Path(tempfile.mkdtemp(prefix="ort-decode-")) / "p"))
    names = [i.name for i in plain.get_inputs()]
    calls = {"n": 0}

    def step(inputs: dict) -> list:
        sess = plain if calls["n"] == 0 else prof  # the first call is the prefill
        calls["n"] += 1
        return [torch.from_numpy(x) for x in sess.run(None, {n: inputs[n].numpy() for n in names})]

    _, timing = generate(step, spec, prompt, steps + 1)
    events = json.loads(Path(prof.end_profiling()).read_text())
    per_op: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / steps
    step_ms = sum(timing["decode_s"]) / len(timing["decode_s"]) * 1e3
    kernels = sum(per_op.values())
    return {"step_ms": step_ms, "kernel_ms": kernels, "outside_kernels_ms": step_ms - kernels,
            "kv_bytes_per_token": timing["kv_bytes_per_token"], "ops": dict(per_op)}


# Runs in a child process: onnxruntime-genai writes its profile when its session closes.
_GENAI_RUN = """
import json, sys, time
import numpy as np
import onnxruntime_genai as og
folder, prompt, steps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = og.Model(folder)
params = og.GeneratorParams(model)
n = len(prompt) + steps + 1
params.set_search_options(do_sample=False, max_length=n, min_length=n)
gen = og.Generator(model, params)
gen.append_tokens(np.array([prompt], dtype=np.int32))
gen.generate_next_token()
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    gen.generate_next_token()
    times.append(time.perf_counter() - t0)
print(json.dumps(times))
"""


def profile_genai(model, folder: Path, prompt, steps: int, threads: int) -> dict | None:
    """onnxruntime-genai int4 (W3's setup), `steps` decode steps after the prompt, profiled -> the
    figures profile_decode gives; None when onnxruntime-genai is not installed."""
    import subprocess

    from benchmarks import harness as H

    if H.genai_decoder(model, folder, "int4", threads) is None:
        return None
    out = folder / "genai-int4"
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    prefix = Path(tempfile.mkdtemp(prefix="genai-decode-")) / "p"
    cfg["model"]["decoder"]["session_options"]["enable_profiling"] = str(prefix)
    cfg_path.write_text(json.dumps(cfg, indent=4))
    done = subprocess.run([sys.executable, "-c", _GENAI_RUN, str(out), json.dumps(prompt[0].tolist()), str(steps)],
                          capture_output=True, text=True, check=True)
    times = json.loads(done.stdout.strip().splitlines()[-1])
    events = json.loads(next(prefix.parent.glob("p*.json")).read_text())
    runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    per_op: dict[str, float] = collections.Counter()
    for e in events:  # the last `steps` runs are the profiled decode steps (the first is the prefill)
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= runs[-steps]:
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / steps
    step_ms = sum(times) / len(times) * 1e3
    kernels = sum(per_op.values())
    return {"step_ms": step_ms, "kernel_ms": kernels, "outside_kernels_ms": step_ms - kernels,
            "kv_bytes_per_token": H.genai_kv_bytes(cfg), "ops": dict(per_op)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:llama-100m")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (the cache length decode starts from)")
    ap.add_argument("--steps", type=int, default=32, help="profiled decode steps")
    ap.add_argument("--recipes", default="recipes/generate.yaml,recipes/llama-int8-kv.yaml")
    ap.add_argument("--genai", action="store_true", help="also profile onnxruntime-genai int4 (pip install '.[bench]')")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12, help="op types to show")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

    import torch

    from benchmarks import harness as H
    from benchmarks.suite import _plain_decoder
    from optcc.intake.decoder import no_guard_module
    from optcc.measure.environment import environment
    from optcc.measure.generation import prompt_ids

    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="decode-profile-"))
    t0 = time.perf_counter()
    with no_guard_module():
        prep, _ = _plain_decoder(a.model, work / "plain", a.threads)
        models = {"plain export + quantize_dynamic int8": (work / "plain" / "plain.int8.onnx", prep.cache),
                  "plain export fp32": (work / "plain" / "model.onnx", prep.cache)}
        for rec in [Path(r) for r in a.recipes.split(",") if r]:
            art = H.optcc_artifacts(rec, a.model, work, a.threads, {"batch": 4, "seq_len": 64})
            onnx = next(Path(x["path"]) for x in art["report"]["artifacts"] if x["format"] == "onnx")
            models[f"optcc {rec.stem}"] = (onnx, art["cache"])
        prompt = prompt_ids(prep.cache, None, a.prompt, 1)
        res = {name: profile_decode(path, spec, prompt, a.steps, a.threads) for name, (path, spec) in models.items()}
        if a.genai:
            got = profile_genai(prep.lm.module._lm, work / "genai", prompt, a.steps, a.threads)  # the HF model in the cache wrapper
            if got is None:
                print("onnxruntime-genai is not installed (pip install '.[bench]'): its column is left out")
            else:
                res["onnxruntime-genai int4"] = got
    env = environment()
    print(f"decode profile: {a.model}, prompt {a.prompt}, {a.steps} profiled steps, batch 1, {a.threads} threads; "
          f"CPU {env.get('cpu')}, flags {', '.join(env.get('cpu_flags') or [])}; built and run in {time.perf_counter() - t0:.0f} s\n")
    names = list(res)
    print("| per token | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key, label in (("step_ms", "step ms (loop's view)"), ("kernel_ms", "kernels ms"),
                       ("outside_kernels_ms", "outside kernels ms")):
        print(f"| {label} | " + " | ".join(f"{res[n][key]:.2f}" for n in names) + " |")
    ops = sorted({op for r in res.values() for op in r["ops"]}, key=lambda op: -max(r["ops"].get(op, 0) for r in res.values()))
    for op in ops[:a.top]:
        print(f"| {op} | " + " | ".join(f"{res[n]['ops'].get(op, 0.0):.2f}" for n in names) + " |")
    if a.json:
        a.json.write_text(json.dumps({"settings": vars(a) | {"json": str(a.json)}, "environment": env, "results": res},
                                     indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
