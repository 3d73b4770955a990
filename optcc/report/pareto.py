"""Views of pareto.json (`optcc tune`): the front as a terminal table, latency against quality
as a self-contained HTML page (inline SVG), and one progress line per finished trial."""
from __future__ import annotations

import html
from typing import Any

from rich.table import Table


def _point(point: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "(defaults)"


def front_table(data: dict) -> Table:
    q = data["quality"]["metric"]
    by_key = {t["key"]: t for t in data["trials"]}
    t = Table(title=f"Pareto front: {data['objective']['backend']} p50 latency vs {q} "
                    f"({data['counts']['ok']} timed, {data['counts']['pruned']} outside the budget, {data['counts']['failed']} failed)")
    for col in ("", "point", "p50 ms", "vs eager fp32", q):
        t.add_column(col, justify="right" if col in ("p50 ms", "vs eager fp32", q) else "left")
    for key in data["front"]:
        r = by_key[key]
        t.add_row("best" if key == data["best"] else "", _point(r["point"]), f"{r['latency']['p50_ms']:.2f}",
                  f"{r['speedup']:.2f}x" if r.get("speedup") else "—", f"{r['metrics'].get(q, float('nan')):.4g}")
    return t


def trial_line(record: dict, done: int, total: int, pruned: int, failed: int, best: Any, eta_s: float) -> str:
    status = record["status"]
    if status == "ok":
        what = f"{record['latency']['p50_ms']:.2f} ms"
    elif status == "pruned":
        miss = next((q for q in record.get("budget", []) if not q["ok"]), None)
        what = f"outside the budget ({miss['metric']} = {miss['value']:.4g})" if miss and isinstance(miss["value"], (int, float)) else "outside the budget"
    else:
        what = f"failed: {record.get('error', '')[:120]}"
    cached = " (cached)" if record.get("cached") else ""
    best_s = f"{best:.2f} ms" if best is not None else "—"
    return (f"[{done}/{total}] {_point(record['point'])}: {what}{cached} · best {best_s} · "
            f"{pruned} pruned, {failed} failed · ETA {int(eta_s) // 60}m{int(eta_s) % 60:02d}s")


def pareto_html(data: dict) -> str:
    """Latency (y) against the budget's quality metric (x): every timed trial, the front joined
    by a line, the best ringed, the budget as a dashed line."""
    q = data["quality"]["metric"]
    ok = [t for t in data["trials"] if t["status"] == "ok"]
    front = set(data["front"])
    W, H, L, B, T, R = 720, 420, 70, 50, 30, 30
    xs = [t["metrics"][q] for t in ok]
    ys = [t["latency"]["p50_ms"] for t in ok]
    bound = float(data["budget"][q].lstrip("<>= "))
    x0, x1 = min(xs + [bound]), max(xs + [bound])
    y0, y1 = 0.0, max(ys) * 1.1
    pad = (x1 - x0) * 0.05 or 0.01
    x0, x1 = x0 - pad, x1 + pad

    def sx(v: float) -> float:
        return L + (v - x0) / (x1 - x0) * (W - L - R)

    def sy(v: float) -> float:
        return H - B - (v - y0) / (y1 - y0) * (H - B - T)

    parts = [f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="#333"/>',
             f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="#333"/>',
             f'<line x1="{sx(bound):.1f}" y1="{T}" x2="{sx(bound):.1f}" y2="{H - B}" stroke="#e76f51" stroke-dasharray="5,4"/>',
             f'<text x="{sx(bound) + 4:.1f}" y="{T + 12}" font-size="11" fill="#e76f51">budget {html.escape(data["budget"][q])}</text>',
             f'<text x="{(W + L) / 2}" y="{H - 12}" font-size="12" text-anchor="middle">{html.escape(q)}</text>',
             f'<text x="16" y="{(H - B + T) / 2}" font-size="12" transform="rotate(-90 16 {(H - B + T) / 2})" '
             f'text-anchor="middle">{html.escape(data["objective"]["backend"])} p50 ms</text>']
    for k in range(5):
        v = y0 + (y1 - y0) * k / 4
        parts.append(f'<text x="{L - 6}" y="{sy(v) + 4:.1f}" font-size="10" text-anchor="end">{v:.1f}</text>')
        v = x0 + (x1 - x0) * k / 4
        parts.append(f'<text x="{sx(v):.1f}" y="{H - B + 16}" font-size="10" text-anchor="middle">{v:.4g}</text>')
    line = sorted((t for t in ok if t["key"] in front), key=lambda t: t["metrics"][q])
    if len(line) > 1:
        pts = " ".join(f"{sx(t['metrics'][q]):.1f},{sy(t['latency']['p50_ms']):.1f}" for t in line)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="#2a9d8f" stroke-width="2"/>')
    for t in ok:
        on = t["key"] in front
        title = html.escape(f"{_point(t['point'])}: {t['latency']['p50_ms']:.2f} ms, {q} {t['metrics'][q]:.4g}")
        parts.append(f'<circle cx="{sx(t["metrics"][q]):.1f}" cy="{sy(t["latency"]["p50_ms"]):.1f}" r="{6 if on else 4}" '
                     f'fill="{"#2a9d8f" if on else "#aaa"}"><title>{title}</title></circle>')
        if t["key"] == data["best"]:
            parts.append(f'<circle cx="{sx(t["metrics"][q]):.1f}" cy="{sy(t["latency"]["p50_ms"]):.1f}" r="10" fill="none" stroke="#264653" stroke-width="2"/>')
    rows = "".join(f"<tr><td>{'best' if t['key'] == data['best'] else ''}</td><td>{html.escape(_point(t['point']))}</td>"
                   f"<td>{t['latency']['p50_ms']:.2f}</td><td>{t['metrics'][q]:.4g}</td></tr>" for t in line)
    return (f"<!doctype html><meta charset='utf-8'><title>optcc tune: {html.escape(data['space'])}</title>"
            f"<body style='font-family:sans-serif'><h2>optcc tune: {html.escape(data['space'])}</h2>"
            f"<p>{data['counts']['ok']} trials timed (grey), the Pareto front in green, the best ringed; "
            f"{data['counts']['pruned']} trials outside the budget were never timed.</p>"
            f"<svg width='{W}' height='{H}' xmlns='http://www.w3.org/2000/svg'>{''.join(parts)}</svg>"
            f"<table border='1' cellpadding='4' style='border-collapse:collapse'><tr><th></th><th>point</th>"
            f"<th>p50 ms</th><th>{html.escape(q)}</th></tr>{rows}</table></body>")
