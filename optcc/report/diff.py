"""`optcc diff`: views of one run's PassRecords (per pass, per block, waterfall,
node-level graph diff) and of two runs side by side; plus the waterfall as a
self-contained HTML file. Views only: every number comes from report.json."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Optional

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from optcc.errors import RecipeError

# timing key -> artifact format (optcc/export/emit.py BACKEND_KEY, inverted)
FORMAT_OF_BACKEND = {"torch": "torch", "torch-exported": "exported", "onnxruntime": "onnx"}


def load_run(out: Path) -> dict:
    path = out / "report.json" if out.is_dir() else out
    if not path.exists():
        raise RecipeError(f"{out}: no report.json here", "pass the output folder of `optcc apply`")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RecipeError(f"{path}: not valid JSON ({e})", "re-run `optcc apply`") from e
    if not isinstance(report, dict) or report.get("optcc_report") != 1 or "passes" not in report:
        raise RecipeError(f"{path}: not an optcc report", "pass the output folder of `optcc apply`")
    return report


def _f(x: Any, d: int = 4) -> str:
    return "—" if x is None else (f"{x:.{d}g}" if isinstance(x, float) else str(x))


def select_passes(report: dict, name: Optional[str]) -> list[dict]:
    """The pass records named by --pass (a name or a step number); all of them for None."""
    recs = report["passes"]
    if name is None:
        return recs
    picked = [p for p in recs if p["name"] == name or f"{p['step']}" == name]
    if not picked:
        names = ", ".join(p["name"] for p in recs) or "none"
        raise RecipeError(f"--pass {name}: this run has no such pass", f"passes in this run: {names}")
    return picked


def pass_sections(report: dict, name: Optional[str] = None) -> list[Panel]:
    out = []
    for p in select_passes(report, name):
        t = Table(box=None, pad_edge=False)
        for c in ("block", "nodes", "removed", "added", "rewired", "weight bytes"):
            t.add_column(c, justify="left" if c == "block" else "right")
        for b in p.get("blocks", []):
            t.add_row(b["block"], f"{b['nodes_before']} → {b['nodes_after']}",
                      f"[red]−{b['removed']}[/red]" if b["removed"] else "0",
                      f"[green]+{b['added']}[/green]" if b["added"] else "0",
                      f"[yellow]~{b['rewired']}[/yellow]" if b.get("rewired") else "0",
                      f"{b['bytes_before']:,} → {b['bytes_after']:,}" if "bytes_before" in b else "—")
        if not p.get("blocks"):
            t.add_row("(no node changed)", "", "", "", "", "")
        before, after = p["before"], p["after"]
        totals = Text.from_markup(
            f"params {before['params']:,} → {after['params']:,}   bytes {before['param_bytes']:,} → {after['param_bytes']:,}   "
            f"GFLOPs {before['flops'] / 1e9:.4g} → {after['flops'] / 1e9:.4g}   cosine {p['fidelity']['cosine_mean']:.6f}"
            + (f"   {p['task_metric'].get('value'):.4g} task metric" if p.get("task_metric") else "")
            + (f"   {p['latency_ms']:.3g} ms (graph)" if p.get("latency_ms") else ""))
        stats = Text(json.dumps(p["stats"], default=str)[:400], style="dim") if p.get("stats") else Text("")
        out.append(Panel(Group(t, totals, stats), title=f"pass {p['step']}: [bold]{p['name']}[/bold]", title_align="left"))
    return out


def waterfall_rows(report: dict) -> list[dict]:
    """Cumulative effect pass by pass: graph latency (and speedup vs the captured graph), fidelity, task metric."""
    cap = report.get("captured") or {}
    base_ms = cap.get("latency_ms")
    rows = [{"step": "captured", "latency_ms": base_ms, "speedup": 1.0 if base_ms else None, "cosine": 1.0,
             "task": (cap.get("task_metric") or {}).get("value"), "flops": cap.get("flops")}]
    for p in report["passes"]:
        ms = p.get("latency_ms")
        rows.append({"step": f"{p['step']}. {p['name']}", "latency_ms": ms,
                     "speedup": p.get("speedup_vs_captured"), "cosine": p["fidelity"]["cosine_mean"],
                     "task": (p.get("task_metric") or {}).get("value"), "flops": p["after"]["flops"]})
    lat = report.get("latency") or {}
    for backend, v in (lat.get("optimized") or {}).items():
        fmt = FORMAT_OF_BACKEND.get(backend, backend)
        fid = report["fidelity"]["by_artifact"].get(fmt, {})
        task = ((report.get("task_metric") or {}).get("by_artifact") or {}).get(fmt, {})
        rows.append({"step": f"artifact: {backend}", "latency_ms": v["p50_ms"],
                     "speedup": lat["speedup_by_backend"][backend], "cosine": fid.get("cosine_mean"),
                     "task": task.get("value"), "flops": None, "vs_eager": True})
    return rows


def waterfall_table(report: dict) -> Table:
    t = Table(title="waterfall (graph steps vs the captured graph; artifacts vs eager torch)")
    for c in ("step", "p50 ms", "speedup", "GFLOPs", "cosine", "task metric"):
        t.add_column(c, justify="left" if c == "step" else "right")
    for r in waterfall_rows(report):
        t.add_row(r["step"], _f(r["latency_ms"]), f"{r['speedup']:.2f}x" if r["speedup"] else "—",
                  _f(r["flops"] / 1e9 if r["flops"] else None), _f(r["cosine"], 6), _f(r["task"]))
    return t


def graph_diff(out: Path, report: dict, name: Optional[str], block: Optional[str]) -> Text:
    text = Text()
    for p in select_passes(report, name):
        path = out / p["graph_diff"] if p.get("graph_diff") else None
        text.append(f"pass {p['step']}: {p['name']}\n", style="bold")
        if path is None or not path.exists():
            text.append("  (no graph diff stored)\n", style="dim")
            continue
        hunks: list[list[str]] = [[]]
        for line in path.read_text().splitlines():
            if line.startswith("@@"):
                hunks.append([])
            hunks[-1].append(line)
        shown = 0
        for hunk in hunks:
            lines = [l for l in hunk if not block or l.startswith(("---", "+++", "@@")) or l.endswith(f"# {block}")]
            if block and not any(l[:1] in "+-" and not l.startswith(("---", "+++")) for l in lines):
                continue
            shown += 1
            for line in lines:
                style = "green" if line.startswith("+") else "red" if line.startswith("-") else "cyan" if line.startswith("@@") else ""
                text.append(line + "\n", style=style)
        if block and not shown:
            text.append(f"  (no node of {block} changed)\n", style="dim")
    return text


def _get(r: dict, *path: str) -> Any:
    cur: Any = r
    for p in path:
        cur = cur.get(p) if isinstance(cur, dict) else None
    return cur


def compare_runs(runs: list[tuple[str, dict]]) -> Table:
    """Runs side by side (e.g. several recipes on one model): one column per run."""
    t = Table(title=f"{len(runs)} runs")
    t.add_column("metric")
    for name, _ in runs:
        t.add_column(name, justify="right")
    rows = [("model", ("model", "source")), ("passes", None), ("speedup", ("latency", "speedup")),
            ("best backend", ("latency", "best_backend")), ("best p50 ms", ("latency", "best", "p50_ms")),
            ("cosine mean", ("fidelity", "cosine_mean")), ("top-1 agreement", ("fidelity", "top1_agreement")),
            ("task metric", ("task_metric", "optimized")), ("params", None), ("GFLOPs", None), ("artifact bytes", None)]
    for label, path in rows:
        cells = []
        for _, r in runs:
            last = r["passes"][-1]["after"] if r["passes"] else r.get("captured") or {}
            if label == "passes":
                cells.append(" → ".join(p["name"] for p in r["passes"]) or "none")
            elif label == "params":
                cells.append(f"{last.get('params', r['model']['params']):,}")
            elif label == "GFLOPs":
                cells.append(_f(last["flops"] / 1e9 if last.get("flops") else None))
            elif label == "artifact bytes":
                cells.append(", ".join(f"{x['format']} {x['bytes']:,}" for x in r["artifacts"]))
            else:
                cells.append(_f(_get(r, *path)))
        t.add_row(label, *cells)
    return t


def sweep_points(runs: list[tuple[str, dict]]) -> list[dict]:
    """One point per run and artifact backend: speedup vs eager torch against output cosine (and task metric)."""
    pts = []
    for name, r in runs:
        lat = r.get("latency") or {}
        for backend, sp in (lat.get("speedup_by_backend") or {}).items():
            fmt = FORMAT_OF_BACKEND.get(backend, backend)
            fid = r["fidelity"]["by_artifact"].get(fmt, {})
            task = ((r.get("task_metric") or {}).get("by_artifact") or {}).get(fmt, {})
            pts.append({"run": name, "backend": backend, "speedup": sp, "cosine": fid.get("cosine_mean"),
                        "task": task.get("value")})
    return pts


def sweep_html(runs: list[tuple[str, dict]]) -> str:
    """A self-contained HTML page: speedup (x) against output cosine (y), one dot per run and backend."""
    pts = [p for p in sweep_points(runs) if p["cosine"] is not None]
    if not pts:
        raise RecipeError("none of these runs was benchmarked", "run `optcc apply` with bench enabled")
    w, h, pad = 640, 400, 60
    xs, ys = [p["speedup"] for p in pts], [p["cosine"] for p in pts]
    x0, x1 = min(xs + [1.0]) * 0.95, max(xs) * 1.05
    y0, y1 = min(ys) - 0.001, 1.0 + 0.0005
    sx = lambda v: pad + (w - 2 * pad) * (v - x0) / ((x1 - x0) or 1)
    sy = lambda v: h - pad - (h - 2 * pad) * (v - y0) / ((y1 - y0) or 1)
    colors = {"torch": "#264653", "torch-exported": "#2a9d8f", "onnxruntime": "#e76f51"}
    dots = []
    for p in pts:
        label = html.escape(f"{p['run']} ({p['backend']}): {p['speedup']:.2f}x, cos {p['cosine']:.5f}"
                            + (f", task {_f(p['task'])}" if p["task"] is not None else ""))
        dots.append(f"<circle cx='{sx(p['speedup']):.1f}' cy='{sy(p['cosine']):.1f}' r='6' fill='{colors.get(p['backend'], '#888')}'>"
                    f"<title>{label}</title></circle><text x='{sx(p['speedup']) + 9:.1f}' y='{sy(p['cosine']) + 4:.1f}' "
                    f"font-size='11'>{html.escape(p['run'])}</text>")
    axes = (f"<line x1='{pad}' y1='{h - pad}' x2='{w - pad}' y2='{h - pad}' stroke='#333'/>"
            f"<line x1='{pad}' y1='{pad}' x2='{pad}' y2='{h - pad}' stroke='#333'/>"
            f"<line x1='{sx(1.0):.1f}' y1='{pad}' x2='{sx(1.0):.1f}' y2='{h - pad}' stroke='#bbb' stroke-dasharray='4'/>"
            f"<text x='{w / 2}' y='{h - 20}' font-size='12' text-anchor='middle'>speedup vs eager torch (p50)</text>"
            f"<text x='15' y='{h / 2}' font-size='12' transform='rotate(-90 15 {h / 2})' text-anchor='middle'>output cosine vs original</text>"
            + "".join(f"<text x='{sx(v):.1f}' y='{h - pad + 16}' font-size='10' text-anchor='middle'>{v:.2f}</text>"
                      for v in (x0, (x0 + x1) / 2, x1))
            + "".join(f"<text x='{pad - 6}' y='{sy(v) + 3:.1f}' font-size='10' text-anchor='end'>{v:.4f}</text>"
                      for v in (y0, (y0 + y1) / 2, y1)))
    legend = " · ".join(f"<span style='color:{c}'>●</span> {b}" for b, c in colors.items())
    return (f"<!doctype html><meta charset='utf-8'><title>optcc sweep</title>"
            f"<h3 style='font-family:sans-serif'>optcc: speedup vs fidelity, {len(runs)} runs</h3>"
            f"<p style='font-family:sans-serif;font-size:13px'>{legend}</p>"
            f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif'>{axes}{''.join(dots)}</svg>\n")


def waterfall_html(report: dict) -> str:
    """A self-contained HTML page with the waterfall as inline SVG bars (no dependencies)."""
    rows = waterfall_rows(report)
    width, bar_h, gap, left = 720, 22, 8, 220
    top = max((r["speedup"] or 0) for r in rows) or 1.0
    parts = []
    for i, r in enumerate(rows):
        y = i * (bar_h + gap) + 30
        sp = r["speedup"] or 0
        w = (width - left - 120) * sp / top
        color = "#2a9d8f" if sp >= 1 else "#e76f51"
        label = html.escape(r["step"])
        parts.append(f'<text x="0" y="{y + 15}" font-size="13">{label}</text>'
                     f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}"/>'
                     f'<text x="{left + w + 6:.1f}" y="{y + 15}" font-size="12">{sp:.2f}x · cos {_f(r["cosine"], 5)}'
                     f'{" · task " + _f(r["task"]) if r["task"] is not None else ""}</text>')
    height = len(rows) * (bar_h + gap) + 40
    title = html.escape(f"optcc waterfall: {report['model']['name']}")
    return (f"<!doctype html><meta charset='utf-8'><title>{title}</title><h3 style='font-family:sans-serif'>{title}</h3>"
            f"<p style='font-family:sans-serif;font-size:13px'>Graph steps: speedup of the graph vs the captured graph "
            f"(eager fx). Artifacts: speedup vs eager torch. Cosine vs the original model's output.</p>"
            f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-family='sans-serif'>"
            f"<text x='{left}' y='18' font-size='12'>speedup</text>{''.join(parts)}</svg>\n")
