"""Rich views of library objects (reports, structures, pass lists). Views only:
nothing here computes a number."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from optcc.report.markdown import human_bytes
from optcc.graph.structure import Structure


def _f(x: Any, d: int = 3) -> str:
    return "—" if x is None else (f"{x:.{d}f}" if isinstance(x, float) else str(x))


def report_tables(r: dict) -> list[Any]:
    out = []
    lat = r.get("latency")
    if lat:
        t = Table(title=f"latency ({r['model']['name']}, {', '.join(f'{k} {v}' for k, v in r['inputs'].items())}, {lat['threads']} threads)")
        for c in ("backend", "p50 ms", "p90 ms", "p99 ms", "items/s", "speedup"):
            t.add_column(c, justify="right" if c != "backend" else "left")
        b = lat["baseline"]
        t.add_row("torch eager (baseline)", _f(b["p50_ms"]), _f(b["p90_ms"]), _f(b["p99_ms"]), _f(b["throughput_per_s"], 1), "1.00x")
        for k, v in lat["optimized"].items():
            sp = lat["speedup_by_backend"][k]
            style = "red" if sp < 1.0 else "green"
            t.add_row(k, _f(v["p50_ms"]), _f(v["p90_ms"]), _f(v["p99_ms"]), _f(v["throughput_per_s"], 1),
                      f"[{style}]{sp:.2f}x[/{style}]" + (" (slower)" if sp < 1.0 else ""))
        out.append(t)
    f = r["fidelity"]
    t = Table(title="fidelity vs original")
    t.add_column("artifact")
    for c in ("cosine mean", "cosine min", "max abs err", "top-1 agree"):
        t.add_column(c, justify="right")
    for name, v in f["by_artifact"].items():
        t.add_row(name, _f(v["cosine_mean"], 6), _f(v["cosine_min"], 6), f"{v['max_abs_err']:.3g}", _f(v.get("top1_agreement"), 4))
    out.append(t)
    if r.get("task_metric"):
        tm = r["task_metric"]
        t = Table(title=f"task metric: {tm['metric']} ({tm['source']}, {tm['samples']} samples)")
        for c in ("baseline", "optimized", "change"):
            t.add_column(c, justify="right")
        t.add_row(_f(tm["baseline"], 4), _f(tm["optimized"], 4), _f(tm["optimized"] - tm["baseline"], 4))
        out.append(t)
    t = Table(title="passes")
    has_task = any(p.get("task_metric") for p in r["passes"])
    cols = ["#", "pass", "nodes −/+", "params", "GFLOPs", "cosine"] + (["task metric"] if has_task else []) + ["seconds"]
    for c in cols:
        t.add_column(c, justify="left" if c == "pass" else "right")
    for p in r["passes"]:
        task = [_f(p["task_metric"]["value"], 4) if p.get("task_metric") else "—"] if has_task else []
        t.add_row(str(p["step"]), p["name"], f"−{p['nodes_removed']}/+{p['nodes_added']}",
                  f"{p['before']['params']:,} → {p['after']['params']:,}",
                  f"{p['before']['flops'] / 1e9:.3f} → {p['after']['flops'] / 1e9:.3f}",
                  _f(p["fidelity"]["cosine_mean"], 6), *task, _f(p["seconds"], 2))
    out.append(t)
    out += [_scores_table(p) for p in r["passes"] if (p.get("stats") or {}).get("scores")]
    out += [_tokens_table(p) for p in r["passes"] if (p.get("stats") or {}).get("blocks")]
    out += [_sqnr_table(p) for p in r["passes"] if (p.get("stats") or {}).get("sqnr_db_min") is not None]
    out += _pass_notes(r["passes"])
    t = Table(title="artifacts")
    for c in ("format", "path", "size", "sha256"):
        t.add_column(c)
    for a in r["artifacts"]:
        t.add_row(a["format"], a["path"], human_bytes(a["bytes"]), a["sha256"][:16])
    out.append(t)
    if r.get("requirements"):
        t = Table(title="requirements")
        for c in ("metric", "required", "value", "ok"):
            t.add_column(c)
        for q in r["requirements"]:
            t.add_row(q["metric"], q["require"], _f(q["value"]), "[green]yes[/green]" if q["ok"] else "[red]NO[/red]")
        out.append(t)
    if r.get("regressions"):
        t = Table(title="regressions vs baseline report")
        for c in ("metric", "previous", "current", "tolerance", "ok"):
            t.add_column(c)
        for q in r["regressions"]:
            t.add_row(q["metric"], _f(q["previous"]), _f(q["current"]), f"{q['tolerance']:g}",
                      "[green]yes[/green]" if q["ok"] else "[red]NO[/red]")
        out.append(t)
    return out


def _scores_table(p: dict) -> Table:
    """A pass's candidate scores (e.g. layer_skip's block influence), the chosen ones marked."""
    st = p["stats"]
    removed = set(st.get("removed_indices") or [])
    if st.get("metric") == "angular_distance" and removed:  # candidates are runs, named by their first block
        removed = {min(removed)}
    metric = st.get("metric", "score").replace("_", " ")
    t = Table(title=f"{p['name']} (pass {p['step']}): candidates", caption="lowest scores go first")
    for c in ("#", "candidate", metric, "removed"):
        t.add_column(c, justify="left" if c == "candidate" else "right")
    for c in st["scores"]:
        t.add_row(str(c["index"]), c["name"], f"{c['score']:.4f}", "[red]yes[/red]" if c["index"] in removed else "")
    return t


def _tokens_table(p: dict) -> Table:
    """token_merge's per-block view: tokens in and out of each block and the FLOPs it saves."""
    st = p["stats"]
    title = f"{p['name']} (pass {p['step']}): tokens and FLOPs per block"
    t = Table(title=title, min_width=len(title) + 2,  # the title on one line
              caption=f"{st['tokens_before']} tokens into every block before; FLOPs at the example inputs, merge ops included")
    for c in ("block", "r", "tokens attention → mlp", "GFLOPs before → after", "saved"):
        t.add_column(c, justify="left" if c == "block" else "right")
    for b in st["blocks"]:
        saved = 1 - b["flops_after"] / b["flops_before"] if b["flops_before"] else 0.0
        t.add_row(b["block"], str(b["r"]), f"{b['tokens_attention']} → {b['tokens_mlp']}",
                  f"{b['flops_before'] / 1e9:.3g} → {b['flops_after'] / 1e9:.3g}", f"{saved:.0%}")
    if st.get("block_flops_saved") is not None:
        t.add_row("all blocks", str(sum(st["r"])), f"{st['tokens_before']} → {st['tokens_after']}", "", f"{st['block_flops_saved']:.0%}")
    return t


def _sqnr_table(p: dict, worst: int = 5) -> Table:
    """quantize's per-layer error: the layers with the lowest SQNR, and the weight bytes."""
    st = p["stats"]
    wb = st["weight_bytes"]
    title = f"{p['name']} (pass {p['step']}): {st['scheme']}, {st['quantized']} linears, lowest SQNR first"
    t = Table(title=title, min_width=len(title) + 2,
              caption=f"weight bytes of the quantized linears {human_bytes(wb['before'])} → {human_bytes(wb['after'])}"
                      + (f" ({wb['ratio']:.2f}x)" if wb.get("ratio") else "")
                      + (f"; kept in fp32: {', '.join(st['excluded'])}" if st.get("excluded") else ""))
    for c in ("layer", "bits", "SQNR dB"):
        t.add_column(c, justify="left" if c == "layer" else "right")
    layers = sorted(st["layers"], key=lambda l: l["sqnr_db"])
    for l in layers[:worst]:
        t.add_row(l["name"], str(l["bits"]), f"{l['sqnr_db']:.1f}")
    if len(layers) > worst:
        t.add_row(f"all {len(layers)}: min / mean", "", f"{st['sqnr_db_min']:.1f} / {st['sqnr_db_mean']:.1f}")
    return t


def _pass_notes(passes: list[dict]) -> list[str]:
    """What passes said about their result (warnings, and notes such as 'slower on this CPU')."""
    lines = []
    for p in passes:
        st = p.get("stats") or {}
        said = list(st.get("warnings") or []) + list(st.get("notes") or []) + ([st["note"]] if st.get("note") else [])
        for text in said:
            style = "red" if text.startswith("SLOWER") else "yellow"
            lines.append(f"[{style}]{p['name']} (pass {p['step']}): {escape(text)}[/{style}]")
    return lines


def structure_tree(name: str, task: str, s: Structure) -> Tree:
    causal = {True: "causal", False: "bidirectional", None: "causality unknown"}[s.causal]
    root = Tree(f"[bold]{name}[/bold] ({task}, {causal})")
    if s.embeddings:
        root.add("embeddings: " + ", ".join(s.embeddings))
    blocks = root.add(f"blocks: {len(s.blocks)} × {s.container or '?'}")
    for b in s.blocks:
        node = blocks.add(f"[bold]{b.path}[/bold]  ({b.norm_position}-norm)")
        a = b.attention
        if a:
            heads = f"{a.num_heads} heads / {a.num_kv_heads} kv, head_dim {a.head_dim}"
            flags = ", ".join(x for x in ("rotary" if a.rotary else "", "fused qkv" if a.fused_qkv else "") if x)
            an = node.add(f"attention {a.path} [{a.kind}] {heads}" + (f" ({flags})" if flags else ""))
            if a.cache:
                an.add(f"kv cache slot {a.cache['slot']}: {a.cache.get('key')}, {a.cache.get('value')}")
            for role in ("q", "k", "v", "o"):
                path = getattr(a, role)
                li = s.linear(path) if path else None
                if li:
                    an.add(f"{role}: {path} {li.in_features}→{li.out_features}")
        if b.mlp:
            mn = node.add(f"mlp {b.mlp.path}" + (" (gated)" if b.mlp.gated else ""))
            for p in b.mlp.linears:
                li = s.linear(p)
                mn.add(f"{p} {li.in_features}→{li.out_features}" + ("  (down)" if p == b.mlp.down else ""))
        if b.norms:
            node.add("norms: " + ", ".join(b.norms))
    if s.final_norms:
        root.add("final norm: " + ", ".join(s.final_norms))
    if s.head:
        root.add("head: " + ", ".join(s.head))
    for n in s.notes:
        root.add(f"[yellow]note: {n}[/yellow]")
    return root


def passes_table(passes: list[dict]) -> Table:
    t = Table(title="passes")
    t.add_column("pass")
    t.add_column("what it does")
    t.add_column("parameters (default)")
    for p in passes:
        params = []
        for k, v in p["config"]["properties"].items():
            params.append(f"{k} = {v.get('default', '(required)')!r}: {v.get('description', '')}")
        t.add_row(p["name"], p["summary"] + (" [lossless]" if p["lossless"] else ""), "\n".join(params) or "—")
    return t


def console(stderr: bool = False) -> Console:
    """Rich console; rich itself drops colour and live displays when the stream is not a TTY."""
    return Console(stderr=stderr, highlight=False, soft_wrap=False)
