"""Markdown view of the report object (report.json is the contract; docs/report.md documents it)."""
from __future__ import annotations

from typing import Any, Optional

def _fmt(x: Any, digits: int = 4) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return "—" if x is None else str(x)


def _pct(x: Optional[float]) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def human_bytes(n: Optional[int]) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def to_markdown(r: dict) -> str:
    lines = [f"# optcc report: {r['model']['name']}", ""]
    lines += [f"- model: `{r['model']['source']}` ({r['model']['task']}, {r['model']['params']:,} parameters)",
              f"- recipe: `{r['recipe']['path']}`",
              "- inputs: " + ", ".join(f"{k} {v}" for k, v in r["inputs"].items()),
              f"- threads: {r['environment']['threads']}, cpu: {r['environment']['cpu']}", ""]
    lat = r.get("latency") or {}
    if lat.get("baseline"):
        lines += ["## Latency", "", "| backend | p50 ms | p90 ms | p99 ms | mean ms | std ms | iters | items/s | speedup |",
                  "|---|---|---|---|---|---|---|---|---|"]
        rows = [("torch eager (baseline)", lat["baseline"], 1.0)]
        rows += [(k, v, lat["speedup_by_backend"].get(k)) for k, v in lat.get("optimized", {}).items()]
        for name, s, sp in rows:
            lines.append(f"| {name} | {s['p50_ms']:.3f} | {s['p90_ms']:.3f} | {s['p99_ms']:.3f} | {s['mean_ms']:.3f} | "
                         f"{s['std_ms']:.3f} | {s['iters']} | {s['throughput_per_s']:.1f} | {_fmt(sp, 3)}x |")
        lines += ["", f"Best speedup vs baseline: **{_fmt(lat.get('speedup'), 3)}x**", ""]
        slower = [k for k, v in lat.get("speedup_by_backend", {}).items() if v is not None and v < 1.0]
        if slower:
            lines += [f"**Slower than the baseline on: {', '.join(slower)}.**", ""]
    lines += _generation(r.get("generation"))
    f = r["fidelity"]
    lines += ["## Fidelity (optimized vs original, primary output)", "",
              "| metric | value |", "|---|---|"]
    for k in ("cosine_mean", "cosine_min", "max_abs_err", "top1_agreement"):
        if k in f:
            lines.append(f"| {k} | {_fmt(f[k], 6)} |")
    task = r.get("task_metric")
    if task:
        lines += ["", f"Task metric ({task['metric']} on {task['source']}, {task['samples']} samples): "
                      f"baseline {_fmt(task['baseline'], 5)}, optimized {_fmt(task['optimized'], 5)}"]
    lines += ["", "## Passes", "", "| # | pass | nodes −/+ | params | FLOPs | cosine | max abs err | seconds |",
              "|---|---|---|---|---|---|---|---|"]
    for p in r["passes"]:
        lines.append(f"| {p['step']} | {p['name']} | −{p['nodes_removed']}/+{p['nodes_added']} | "
                     f"{p['before']['params']:,} → {p['after']['params']:,} | {p['before']['flops']:,} → {p['after']['flops']:,} | "
                     f"{p['fidelity']['cosine_mean']:.6f} | {p['fidelity']['max_abs_err']:.3g} | {p['seconds']:.2f} |")
    if not r["passes"]:
        lines.append("| – | (no passes) | | | | | | |")
    lines += ["", "## Artifacts", "", "| format | file | size | sha256 |", "|---|---|---|---|"]
    for a in r["artifacts"]:
        lines.append(f"| {a['format']} | {a['path']} | {human_bytes(a['bytes'])} | `{a['sha256'][:16]}…` |")
    if r.get("requirements"):
        lines += ["", "## Requirements", "", "| metric | required | value | ok |", "|---|---|---|---|"]
        for q in r["requirements"]:
            lines.append(f"| {q['metric']} | {q['require']} | {_fmt(q['value'])} | {'yes' if q['ok'] else '**NO**'} |")
    if r.get("regressions"):
        lines += ["", "## Regressions vs the baseline report", "", "| metric | previous | current | tolerance | ok |", "|---|---|---|---|---|"]
        for q in r["regressions"]:
            tol = f"{q['tolerance']:g}{' relative' if q['relative'] else ''}"
            lines.append(f"| {q['metric']} | {_fmt(q['previous'])} | {_fmt(q['current'])} | {tol} | {'yes' if q['ok'] else '**NO**'} |")
    return "\n".join(lines) + "\n"


def _generation(g: Optional[dict]) -> list[str]:
    """Decoders: the generation bench (TTFT, decode speed, KV bytes per token, greedy match)."""
    if not g:
        return []
    lines = [f"## Generation ({g['prompt_tokens']}-token prompt, {g['new_tokens']} new tokens, batch {g['batch']})", "",
             "| backend | TTFT ms | decode ms/token p50 | tokens/s | decode speedup | loop share | KV bytes/token | greedy match |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [("torch eager (baseline)", g["baseline"], 1.0, None)]
    rows += [(k, v, g["decode_speedup_by_backend"].get(k), g["greedy_match_by_backend"].get(k))
             for k, v in g.get("optimized", {}).items()]
    for name, s, sp, match in rows:
        lines.append(f"| {name} | {_fmt(s['ttft_ms'])} | {_fmt(s['decode_ms_per_token_p50'])} | "
                     f"{_fmt(s['decode_tokens_per_s'])} | {_fmt(sp, 3)}x | {_pct(s.get('decode_loop_share'))} | "
                     f"{_fmt(s['kv_bytes_per_token'])} | "
                     f"{'—' if match is None else ('yes' if match else 'no')} |")
    lines += ["", f"KV bytes per token vs baseline: **{_fmt(g.get('kv_bytes_ratio'), 3)}x**. Loop share: of decode time, "
              "the part outside the graph in optcc's generation loop (feeds, the cache handed back, argmax).", ""]
    slower = [k for k, v in g.get("decode_speedup_by_backend", {}).items() if v is not None and v < 1.0]
    if slower:
        lines += [f"**Decoding is slower than the baseline on: {', '.join(slower)}.**", ""]
    return lines
