"""optcc command line: parse, call the library (optcc.api), render. Nothing else.

Results go to stdout, progress and logs to stderr. Errors are one line with the
next step and a distinct exit code (see optcc.errors); --debug shows tracebacks.
"""
from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Callable, Optional

import typer

from optcc.errors import OptccError, RecipeError, RequirementError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="optcc: rewrite trained PyTorch models for deployment, from a YAML recipe.")


def _guard(debug: bool, fn: Callable[[], int | None]) -> None:
    try:
        code = fn()
    except RequirementError as e:
        typer.echo(f"optcc: {e.kind}: {e.one_line()}", err=True)
        raise typer.Exit(e.exit_code)
    except OptccError as e:
        if debug:
            traceback.print_exc()
        typer.echo(f"optcc: {e.kind}: {e.one_line()}", err=True)
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("optcc: interrupted; no output was written", err=True)
        raise typer.Exit(130)
    except Exception as e:  # a bug: still one line unless --debug
        if debug:
            traceback.print_exc()
        typer.echo(f"optcc: internal error: {type(e).__name__}: {e} (rerun with --debug and report it)", err=True)
        raise typer.Exit(1)
    if code:
        raise typer.Exit(code)


@app.command()
def apply(
    recipe: Path = typer.Argument(..., help="recipe YAML"),
    model: Optional[str] = typer.Argument(None, help="builtin:NAME | HF folder | model.pt2 | file.py:factory | pkg.mod:factory (default: the recipe's model.source)"),
    out: Path = typer.Option(Path("out"), "--out", "-o", help="output folder (replaced atomically)"),
    task: Optional[str] = typer.Option(None, help="override the task (e.g. text-generation)"),
    weights: Optional[str] = typer.Option(None, help="safetensors state dict for a factory model"),
    as_json: bool = typer.Option(False, "--json", help="print report.json on stdout"),
    baseline: Optional[Path] = typer.Option(None, help="previous report.json: fail (exit 7) on a regression beyond --tolerance"),
    tolerance: Optional[float] = typer.Option(None, help="regression tolerance (default: 10% speedup, 0.002 cosine, 1% task metric)"),
    debug: bool = typer.Option(False, help="show tracebacks"),
) -> None:
    """Run a recipe on a model: passes → verified artifacts → report."""
    from optcc.api import apply as run_apply
    from optcc.report.terminal import console
    from optcc.report.progress import Progress

    def go() -> None:
        err = console(stderr=True)
        with Progress(err) as progress:
            try:
                report = run_apply(recipe, model, out, task=task, weights=weights, on_event=progress.event,
                                   baseline=baseline, tolerance=tolerance)
            except RequirementError:
                _show(json.loads((out / "report.json").read_text()), as_json, out)
                raise
        _show(report, as_json, out)

    _guard(debug, go)


def _show(report: dict, as_json: bool, out: Path) -> None:
    from optcc.report.terminal import console, report_tables

    if as_json:  # exactly the report.json that was written (artifact paths relative to the folder)
        typer.echo((out / "report.json").read_text().rstrip("\n"))
        return
    con = console()
    for t in report_tables(report):
        con.print(t)
    con.print(f"wrote {out}/ (report.json, report.md, recipe.lock.yaml, "
              + ", ".join(Path(a['path']).name for a in report["artifacts"]) + ")")


@app.command()
def diff(
    out: Path = typer.Argument(..., help="output folder of `optcc apply`"),
    others: Optional[list[Path]] = typer.Argument(None, help="more output folders to compare with (e.g. a sweep over r)"),
    pass_name: Optional[str] = typer.Option(None, "--pass", help="only this pass (name or step number)"),
    graph: bool = typer.Option(False, "--graph", help="node-level diff of the graph (removed red, added green)"),
    block: Optional[str] = typer.Option(None, help="with --graph: only nodes of this block, e.g. model.layers.3"),
    plot: Optional[Path] = typer.Option(None, help="with several runs: write a speedup-vs-fidelity HTML plot here"),
    as_json: bool = typer.Option(False, "--json", help="print the pass records as JSON"),
    debug: bool = typer.Option(False, help="show tracebacks"),
) -> None:
    """Show what each pass changed: per block, totals, and a speed/fidelity waterfall; or compare runs."""
    from optcc.report import diff as diffview
    from optcc.report.terminal import console

    def go() -> None:
        report = diffview.load_run(out)
        con = console()
        if others:
            runs = [(str(out), report)] + [(str(o), diffview.load_run(o)) for o in others]
            if plot is not None:
                plot.write_text(diffview.sweep_html(runs))
            if as_json:
                typer.echo(json.dumps({name: {"passes": r["passes"], "points": diffview.sweep_points([(name, r)])}
                                       for name, r in runs}, indent=2))
                return
            con.print(diffview.compare_runs(runs))
            if plot is not None:
                typer.echo(f"wrote {plot}", err=True)
            return
        if plot is not None:
            raise RecipeError("--plot compares several runs", f"name more output folders, or open {out / 'waterfall.html'}")
        if as_json:
            typer.echo(json.dumps(diffview.select_passes(report, pass_name), indent=2))
        elif graph:
            con.print(diffview.graph_diff(out, report, pass_name, block))
        else:
            for panel in diffview.pass_sections(report, pass_name):
                con.print(panel)
            con.print(diffview.waterfall_table(report))

    _guard(debug, go)


@app.command()
def inspect(
    model: str = typer.Argument(..., help="builtin:NAME | HF folder | model.pt2 | file.py:factory"),
    task: Optional[str] = typer.Option(None, help="override the task"),
    weights: Optional[str] = typer.Option(None, help="safetensors state dict for a factory model"),
    recipe: Optional[Path] = typer.Option(None, help="recipe whose model.inputs shape the example inputs"),
    as_json: bool = typer.Option(False, "--json", help="print the structure as JSON"),
    debug: bool = typer.Option(False, help="show tracebacks"),
) -> None:
    """Show the structure optcc sees: blocks, attention, MLP, norms, head."""
    from optcc.api import inspect_model
    from optcc.config.recipe import load_recipe
    from optcc.report.terminal import console, structure_tree

    def go() -> None:
        rec = load_recipe(recipe) if recipe else None
        lm, s = inspect_model(model, task, weights, rec)
        if as_json:
            typer.echo(json.dumps({"model": lm.source, "task": lm.task, "structure": s.to_dict()}, indent=2))
        else:
            console().print(structure_tree(lm.name, lm.task, s))

    _guard(debug, go)


@app.command()
def run(
    artifact: Path = typer.Argument(..., help="model.onnx, model.pt2 or the output folder of a text-generation apply"),
    prompt: Optional[str] = typer.Option(None, help="prompt text (byte-level models)"),
    tokens: Optional[str] = typer.Option(None, help="prompt as comma-separated token ids"),
    new_tokens: int = typer.Option(32, "--new-tokens", help="tokens to generate"),
    as_json: bool = typer.Option(False, "--json", help="print tokens, text and timings as JSON"),
    debug: bool = typer.Option(False, help="show tracebacks"),
) -> None:
    """Generate tokens greedily from a decoder artifact."""
    from optcc.api import run_artifact
    from optcc.errors import RecipeError

    def go() -> None:
        ids = None
        if tokens is not None:
            try:
                ids = [int(t) for t in tokens.split(",") if t.strip()]
            except ValueError as e:
                raise RecipeError(f"--tokens {tokens!r}: not comma-separated integers", "e.g. --tokens 12,40,7") from e
        res = run_artifact(artifact, prompt, ids, new_tokens)
        if as_json:
            typer.echo(json.dumps(res, indent=2))
        else:
            typer.echo(res.get("text", " ".join(map(str, res["tokens"]))))
            typer.echo(f"prefill {res['prefill_ms']:.1f} ms, decode {res['decode_ms_per_token'] or 0:.2f} ms/token", err=True)

    _guard(debug, go)


@app.command()
def tune(
    space: Path = typer.Argument(..., help="search space YAML: a recipe whose options may be lists or ranges, with a tune: section"),
    model: Optional[str] = typer.Argument(None, help="model source (default: the space's model.source)"),
    out: Path = typer.Option(Path("out"), "--out", "-o", help="output folder: pareto.json, pareto.html, best.yaml, best/"),
    workers: Optional[int] = typer.Option(None, help="trials built and evaluated at once (default: tune.workers)"),
    ray: Optional[str] = typer.Option(None, help="run trials as Ray tasks on the cluster at this address (host:port or auto)"),
    trials: Optional[int] = typer.Option(None, help="most trials (default: tune.trials)"),
    cache: Optional[Path] = typer.Option(None, help="trial cache (default: ~/.cache/optcc/tune); a rerun resumes from it"),
    task: Optional[str] = typer.Option(None, help="override the task"),
    weights: Optional[str] = typer.Option(None, help="safetensors state dict for a factory model"),
    as_json: bool = typer.Option(False, "--json", help="print pareto.json on stdout"),
    debug: bool = typer.Option(False, help="show tracebacks"),
) -> None:
    """Search a space for the fastest recipe inside its quality budget (require:)."""
    from optcc.report.pareto import front_table, trial_line
    from optcc.report.terminal import console
    from optcc.api import tune as run_tune

    def go() -> None:
        err = console(stderr=True)

        def event(kind: str, **d) -> None:
            if kind == "stage":
                err.print(f"[dim]{d['name']}[/dim]")
            elif kind == "trial":
                err.print(trial_line(**d), markup=False, highlight=False)

        data = run_tune(space, model, out, task=task, weights=weights, workers=workers, ray=ray, trials=trials,
                        cache=cache, on_event=event)
        if as_json:
            typer.echo((out / "pareto.json").read_text().rstrip("\n"))
            return
        con = console()
        con.print(front_table(data))
        con.print(f"wrote {out}/ (pareto.json, pareto.html, best.yaml, best/); `optcc apply {out}/best.yaml` rebuilds the winner")

    _guard(debug, go)


@app.command("passes")
def passes_cmd(as_json: bool = typer.Option(False, "--json", help="print as JSON")) -> None:
    """List the available passes with their parameters and defaults."""
    from optcc.api import list_passes
    from optcc.report.terminal import console, passes_table

    ps = list_passes()
    if as_json:
        typer.echo(json.dumps(ps, indent=2))
    else:
        console().print(passes_table(ps))


@app.command()
def validate(
    recipe: Path = typer.Argument(..., help="recipe YAML (or an `optcc tune` search space)"),
    as_json: bool = typer.Option(False, "--json", help="print the resolved recipe as JSON"),
    debug: bool = typer.Option(False, help="show tracebacks"),
) -> None:
    """Check a recipe (or a search space) without running it; print the fully resolved form."""
    from optcc.config.recipe import load_recipe
    from optcc.config.space import is_space, load_space

    def go() -> None:
        if is_space(recipe):
            sp = load_space(recipe)
            if as_json:
                typer.echo(json.dumps({"space": str(recipe), "searched": [d.name for d in sp.dims], "points": sp.size(),
                                       "first": sp.recipe_dict(sp.first())}, indent=2, default=str))
            else:
                size = f"{sp.size()} points" if sp.size() is not None else "continuous ranges"
                typer.echo(f"{recipe}: ok, a search space for `optcc tune` ({len(sp.dims)} searched: "
                           f"{', '.join(d.name for d in sp.dims)}; {size})")
            return
        r = load_recipe(recipe)
        if as_json:
            typer.echo(json.dumps(r.to_dict(), indent=2))
        else:
            typer.echo(f"{recipe}: ok ({len(r.passes)} passes: {', '.join(s.name for s in r.passes) or 'none'})")

    _guard(debug, go)


@app.command()
def schema(report: bool = typer.Option(False, "--report", help="the schema of report.json instead"),
           space: bool = typer.Option(False, "--space", help="the schema of a search space (`optcc tune`) instead")) -> None:
    """Print the recipe's JSON Schema (or, with --report, report.json's; with --space, a search space's)."""
    if space:
        from optcc.config.space import space_json_schema

        typer.echo(json.dumps(space_json_schema(), indent=2))
        return
    if report:
        from optcc.report.records import report_json_schema

        typer.echo(json.dumps(report_json_schema(), indent=2))
        return
    from optcc.config.recipe import recipe_json_schema

    typer.echo(json.dumps(recipe_json_schema(), indent=2))


def main() -> None:
    app(prog_name="optcc")


if __name__ == "__main__":
    main()
