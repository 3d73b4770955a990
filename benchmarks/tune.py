"""`optcc tune` against the hand-written recipes, and its wall time by executor.

    python benchmarks/tune.py [--only vit,minilm,scale] [--json PATH] [--md PATH]

Targets (ratios measured in one run, so that they hold on any CPU):
  vit, minilm  For each ready-made space (recipes/tune-vit-digits.yaml, recipes/tune-minilm.yaml),
               `optcc tune` runs from an empty cache. Every hand-written recipe in recipes/ for the
               same model is applied at the space's shapes, threads, evaluation set and budget;
               those that miss the budget are listed and not timed. Then tune's best artifact,
               each hand-written artifact inside the budget (all ONNX on onnxruntime, the space's
               backend) and torch eager fp32 are timed round-robin in one process.
               ratio = fastest hand-written p50 / tune's best p50 (target >= 1.2).
  scale        One 6-point grid on the reference ViT (token_merge r 8 or 16 or none, int8 per-tensor
               or none), each from an empty cache: 1, 2 and 4 local workers, and a local Ray cluster
               (a head with no CPUs and two one-CPU worker nodes, on this machine). Wall time of the
               search (model load + trials, without re-timing the front or applying best.yaml), and
               the share of the trials' time spent evaluating on the graph, building and timing.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from optcc import api  # noqa: E402
from optcc.config.recipe import load_recipe  # noqa: E402
from optcc.config.space import load_space  # noqa: E402
from optcc.errors import RequirementError  # noqa: E402
from optcc.export.emit import load_onnx  # noqa: E402
from optcc.measure.environment import environment  # noqa: E402
from optcc.measure.latency import measure  # noqa: E402

SPACES = {"vit": ROOT / "recipes" / "tune-vit-digits.yaml", "minilm": ROOT / "recipes" / "tune-minilm.yaml"}

SCALE_SPACE = """version: 1
model: {source: builtin:vit-digits, inputs: {batch: 64}}
passes:
  - cleanup
  - token_merge: {r: [8, 16]}
    optional: true
  - quantize: {scheme: int8-dynamic, activations: per-tensor}
    optional: true
emit: {formats: [onnx]}
bench: {backends: [onnxruntime], warmup: 3, iters: 10, min_seconds: 1.0}
tune: {trials: 6, retime: false}
require: {task.accuracy_drop: "<= 1.0"}
"""


def hand_written(source: str) -> list[Path]:
    """recipes/*.yaml for this model, the tune spaces left out."""
    out = []
    for p in sorted((ROOT / "recipes").glob("*.yaml")):
        if p.name.startswith("tune-"):
            continue
        if (yaml.safe_load(p.read_text()).get("model") or {}).get("source") == source:
            out.append(p)
    return out


def as_space_sees_it(recipe: Path, space_sections: dict, dest: Path) -> Path:
    """The hand-written recipe at the space's inputs, bench, evaluation set and budget, ONNX only."""
    d = yaml.safe_load(recipe.read_text())
    d["model"] = {**d["model"], "inputs": space_sections["model"]["inputs"]}
    d["emit"] = {**(d.get("emit") or {}), "formats": ["onnx"]}
    d["bench"] = space_sections["bench"]
    for key in ("evaluate", "require"):
        if key in space_sections:
            d[key] = space_sections[key]
    dest.write_text(yaml.safe_dump(d, sort_keys=False))
    return dest


def target(name: str, work: Path) -> dict:
    space_path = SPACES[name]
    space = load_space(space_path)
    sections = {**space.sections, "require": dict(space.require)}
    source = sections["model"]["source"]
    print(f"== {name}: optcc tune {space_path.relative_to(ROOT)} (empty cache)", flush=True)
    t0 = time.perf_counter()
    data = api.tune(space_path, out=work / name / "tune", cache=work / name / "cache",
                    on_event=lambda kind, **d: _progress(kind, d))
    tune_wall = time.perf_counter() - t0
    best = next(t for t in data["trials"] if t["key"] == data["best"])
    rows = [{"name": "optcc tune best", "recipe": "out/best.yaml", "point": best["point"],
             "quality": best["metrics"][data["quality"]["metric"]], "artifact": work / name / "tune" / "best" / "model.onnx"}]
    for rp in hand_written(source):
        print(f"== {name}: optcc apply {rp.relative_to(ROOT)} at the space's shapes and budget", flush=True)
        spec = as_space_sees_it(rp, sections, work / name / f"{rp.stem}.yaml")
        out = work / name / rp.stem
        try:
            report = api.apply(spec, out=out)
            meets, why = True, ""
        except RequirementError as e:
            report, meets, why = json.loads((out / "report.json").read_text()), False, e.one_line()
        q = _quality(report, data["quality"]["metric"])
        rows.append({"name": rp.stem, "recipe": str(rp.relative_to(ROOT)), "quality": q, "meets_budget": meets,
                     "why": why, "artifact": out / "model.onnx"})
    prep = api.prepare(source, None, None, load_recipe(work / name / "tune" / "best.yaml"))
    inputs = prep.inputs
    threads = torch.get_num_threads()
    fns = {"torch eager fp32": lambda: prep.lm.module(**inputs)}
    for r in rows:
        if r.get("meets_budget", True):
            run = load_onnx(r["artifact"], threads)
            fns[r["name"]] = (lambda run=run: run(inputs))
    b = yaml.safe_load(space_path.read_text())["bench"]
    items = next(iter(inputs.values())).shape[0]
    print(f"== {name}: timing {len(fns)} contenders round-robin", flush=True)
    res = measure(fns, warmup=b.get("warmup", 3), iters=max(20, b.get("iters", 10)), min_seconds=3.0, items=items)
    for r in rows:
        if r["name"] in res:
            r["p50_ms"] = res[r["name"]]["p50_ms"]
            r["speedup_vs_eager"] = res["torch eager fp32"]["p50_ms"] / r["p50_ms"]
        r["artifact"] = str(r["artifact"])
    timed_hand = [r for r in rows[1:] if "p50_ms" in r]
    fastest = min(timed_hand, key=lambda r: r["p50_ms"]) if timed_hand else None
    return {
        "space": str(space_path.relative_to(ROOT)), "budget": dict(space.require), "threads": threads,
        "inputs": sections["model"]["inputs"], "eager_p50_ms": res["torch eager fp32"]["p50_ms"],
        "tune": {"wall_s": round(tune_wall, 1), "sampler": data["sampler"], "counts": data["counts"],
                 "time": data["time"], "best": best["point"]},
        "rows": rows, "fastest_hand_written": fastest["name"] if fastest else None,
        "ratio_vs_fastest_hand_written": fastest["p50_ms"] / rows[0]["p50_ms"] if fastest else None,
    }


def _quality(report: dict, metric: str):
    from optcc.config.gates import METRICS

    try:
        return METRICS[metric](report)
    except Exception:  # noqa: BLE001 - a report without that metric
        return None


def _progress(kind: str, d: dict) -> None:
    if kind == "stage":
        print(f"   {d['name']}", flush=True)
    elif kind == "trial":
        from optcc.report.pareto import trial_line

        print("   " + trial_line(**d), flush=True)


def scale(work: Path) -> list[dict]:
    space = work / "scale.yaml"
    space.write_text(SCALE_SPACE)
    rows = []
    for workers in (1, 2, 4):
        rows.append(_scale_run(space, work / f"scale-w{workers}", f"{workers} local worker(s)", workers=workers))
    try:
        import ray
        from ray.cluster_utils import Cluster
    except ImportError:
        print("   ray is not installed (pip install 'optcc[ray]'): the Ray row is skipped")
        return rows
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        rows.append(_scale_run(space, work / "scale-ray", "local Ray cluster, 2 one-CPU nodes", workers=2,
                               ray=cluster.address))
    finally:
        ray.shutdown()
        cluster.shutdown()
    return rows


def _scale_run(space: Path, folder: Path, label: str, **kw) -> dict:
    print(f"== scale: {label}", flush=True)
    t0 = time.perf_counter()
    data = api.tune(space, out=folder / "out", cache=folder / "cache", on_event=lambda kind, **d: _progress(kind, d), **kw)
    wall = time.perf_counter() - t0
    t = data["time"]
    work = sum(t[k] for k in ("evaluate_s", "build_s", "time_s")) or 1.0
    return {"executor": label, "wall_s": round(wall, 1), "search_s": t["search_wall_s"], "time": t,
            "share": {k: t[f"{k}_s"] / work for k in ("evaluate", "build", "time")}, "counts": data["counts"],
            "best": next(t for t in data["trials"] if t["key"] == data["best"])["point"]}


def render(result: dict) -> str:
    env = result["environment"]
    lines = [f"# optcc tune ({result['date']})", "",
             f"- CPU: {env.get('cpu')}, {env.get('threads')} threads; flags that decide kernel speed: "
             f"{', '.join(env.get('cpu_flags') or []) or 'none of them'}",
             f"- torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')}",
             "- command: `python benchmarks/tune.py`", ""]
    for name in ("vit", "minilm"):
        t = result.get(name)
        if not t:
            continue
        lines += [f"## {t['space']} (budget {t['budget']}, inputs {t['inputs']})", "",
                  f"tune: {t['tune']['sampler']}, {t['tune']['counts']}, wall {t['tune']['wall_s']} s; "
                  f"best point {t['tune']['best']}", "",
                  "| contender | quality | within budget | p50 ms | vs eager fp32 |", "|---|---|---|---|---|",
                  f"| torch eager fp32 | - | - | {t['eager_p50_ms']:.2f} | 1.00x |"]
        for r in t["rows"]:
            q = "-" if r["quality"] is None else f"{r['quality']:.4g}"
            p = f"{r['p50_ms']:.2f}" if "p50_ms" in r else "not timed"
            s = f"{r['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in r else "-"
            lines.append(f"| {r['name']} | {q} | {'yes' if r.get('meets_budget', True) else 'no'} | {p} | {s} |")
        ratio = t["ratio_vs_fastest_hand_written"]
        lines += ["", f"**tune best vs fastest hand-written ({t['fastest_hand_written']}): "
                      f"{ratio:.2f}x** (target 1.2x)" if ratio else "no hand-written recipe meets the budget", ""]
    if result.get("scale"):
        lines += ["## Wall time by executor (6-point grid, reference ViT, empty cache each)", "",
                  "| executor | wall s | search s | evaluate share | build share | time share |", "|---|---|---|---|---|---|"]
        for r in result["scale"]:
            sh = r["share"]
            lines.append(f"| {r['executor']} | {r['wall_s']} | {r['search_s']} | {sh.get('evaluate', 0):.0%} | "
                         f"{sh.get('build', 0):.0%} | {sh.get('time', 0):.0%} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="vit,minilm,scale")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="optcc-tune-bench-"))
    result: dict = {"date": time.strftime("%Y-%m-%d"), "environment": environment()}
    try:
        for part in args.only.split(","):
            result[part] = scale(work) if part == "scale" else target(part, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    md = render(result)
    print(md)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.md:
        args.md.write_text(md + "\n")


if __name__ == "__main__":
    main()
