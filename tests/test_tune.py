"""`optcc tune`: the search space, cheap-first trials, the prefix and trial caches, the Pareto
front, the outputs, worker processes (one dying), a real local Ray cluster, and bad input."""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, write_recipe
from optcc.algorithms.pareto import front
from optcc.config.space import load_space, parse_space, space_json_schema
from optcc.errors import RecipeError, RequirementError

# tiny-vit (random weights, 4 blocks): budgets on fidelity, since it has no held-out data
SPACE = """
version: 1
model: {{source: builtin:tiny-vit, inputs: {{batch: 4}}}}
passes:
{passes}
emit: {{formats: [onnx]}}
bench: {{backends: [onnxruntime], warmup: 1, iters: 3, min_seconds: 0.0}}
tune: {{trials: 8{extra}}}
require:
  fidelity.cosine_mean: "{bound}"
"""


# 6 points: token_merge (r 2 or 4) or not, times quantize or not
PASSES = """  - cleanup
  - token_merge: {r: [2, 4]}
    optional: true
  - quantize: {scheme: int8-dynamic}
    optional: true"""
# 2 points: for the tests that kill workers
TWO = """  - token_merge: {r: [2, 4]}"""


def space_file(tmp_path, bound=">= 0.9", extra="", passes=PASSES, name="space.yaml"):
    return write_recipe(tmp_path, SPACE.format(bound=bound, extra=extra, passes=passes), name)


def run(space, out, **kw):
    from optcc.api import tune

    events = []
    kw.setdefault("cache", out.parent / "cache")
    data = tune(space, out=out, on_event=lambda kind, **d: events.append((kind, d)), **kw)
    return data, events


# --- the space ---------------------------------------------------------------------------------

def test_a_space_enumerates_each_distinct_point_once(tmp_path):
    s = load_space(space_file(tmp_path))
    assert [d.name for d in s.dims] == ["use.token_merge", "token_merge.r", "use.quantize"]
    points = list(s.grid())
    # r does not matter when token_merge is left out: (2 + 1) x 2 points, not 8
    assert points[:3] == [{"use.token_merge": True, "token_merge.r": 2, "use.quantize": True},
                          {"use.token_merge": True, "token_merge.r": 2, "use.quantize": False},
                          {"use.token_merge": True, "token_merge.r": 4, "use.quantize": True}]
    assert s.size() == 6 and len(points) == 6
    r = s.recipe({"use.token_merge": False, "use.quantize": True})
    assert [p.name for p in r.passes] == ["cleanup", "quantize"]
    r = s.recipe(points[2])
    assert r.passes[1].config.r == 4 and r.require == {"fidelity.cosine_mean": ">= 0.9"}


def test_ranges_lists_and_choices():
    s = parse_space("""
version: 1
passes:
  - token_merge: {r: {range: [4, 12], step: 4}, ratio: null, start: 1}
  - quantize: {activations: [per-token, per-tensor], exclude: [lm_head], include_head: {choices: [true, false]}}
require: {fidelity.cosine_mean: ">= 0.99"}
""")
    dims = {d.name: d for d in s.dims}
    assert dims["token_merge.r"].grid() == [4, 8, 12]
    assert dims["quantize.activations"].choices == ("per-token", "per-tensor")
    assert dims["quantize.include_head"].choices == (True, False)
    assert "quantize.exclude" not in dims  # a list-only option: a bare list is its value
    assert s.passes[1].fixed == {"exclude": ["lm_head"]}
    assert s.size() == 12
    s = parse_space("""
version: 1
passes:
  - token_merge: {ratio: {range: [0.1, 0.5]}}
require: {fidelity.cosine_mean: ">= 0.99"}
""")
    assert s.size() is None and list(s.grid()) == []  # continuous: sampled, not enumerated


@pytest.mark.parametrize("text, where, words", [
    ("passes: []", "passes", "space is empty"),
    ("passes: [cleanup, quantize]", "passes", "no option is a list or a range"),
    ("passes: [{token_merge: {r: []}}]", "passes[0].token_merge.r", "no values to choose from"),
    ("passes: [{token_merge: {r: {range: [8, 4]}}}]", "passes[0].token_merge.r.range", "space is empty"),
    ("passes: [{quantize: {scheme: {range: [1, 2]}}}]", "passes[0].quantize.scheme", "range needs a numeric option"),
    ("passes: [{token_merge: {r: [4, x]}}]", "passes[0].token_merge.r[1]", "expected"),
    ("passes: [{token_merge: {rr: [4, 8]}}]", "passes[0].token_merge.rr", "unknown key"),
    ("passes: [{token_merge: {r: [4]}, optional: yes-please}]", "passes[0].optional", "true/false"),
    ("passes: [{quantize: {activations: [per-token, per-row]}}]", "passes[0].quantize.activations[1]", "per-row"),
    ("tune: {workers: 0}\npasses: [{token_merge: {r: [4, 8]}}]", "tune", "workers must be >= 1"),
    ("tune: {executor: ray}\npasses: [{token_merge: {r: [4, 8]}}]", "tune.ray_address", "needs a cluster address"),
])
def test_a_bad_space_is_one_line_naming_the_field(text, where, words):
    body = f"version: 1\n{text}\nrequire: {{fidelity.cosine_mean: '>= 0.9'}}\n"
    with pytest.raises(RecipeError) as e:
        parse_space(body, "s.yaml")
    msg = e.value.one_line()
    assert where in msg and words in msg and "\n" not in msg


def test_a_budget_is_a_quality_bound():
    with pytest.raises(RecipeError, match="tune needs a budget"):
        parse_space("version: 1\npasses: [{token_merge: {r: [4, 8]}}]\n")
    with pytest.raises(RecipeError, match=r"require\.speedup.*latency is the objective"):
        parse_space("version: 1\npasses: [{token_merge: {r: [4, 8]}}]\nrequire: {speedup: '>= 2'}\n")


def test_the_shipped_spaces_validate_and_match_the_published_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = space_json_schema()
    assert json.loads((ROOT / "docs" / "space.schema.json").read_text()) == schema, \
        "docs/space.schema.json is stale: optcc schema --space > docs/space.schema.json"
    for name in ("tune-vit-digits.yaml", "tune-minilm.yaml"):
        s = load_space(ROOT / "recipes" / name)
        assert s.dims and s.require
        jsonschema.validate(yaml.safe_load((ROOT / "recipes" / name).read_text()), schema)


def test_pareto_front():
    pts = [(1.0, 0.5), (2.0, 0.9), (1.5, 0.4), (3.0, 0.95), (3.0, 0.9), (0.5, 0.1)]
    assert front(pts) == [5, 0, 1, 3]  # (1.5, 0.4) and (3.0, 0.9) are dominated
    assert front([(1.0, 0.5), (2.0, 0.1), (1.5, 0.4)], higher_quality_better=False) == [0, 2, 1]


# --- the machine lock -------------------------------------------------------------------------

def _hold_shared(seconds, ready):
    from optcc.measure.machine import shared_work

    with shared_work():
        ready.set()
        time.sleep(seconds)


def test_timing_waits_until_no_work_runs_beside_it():
    from optcc.measure.machine import exclusive_timing

    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_hold_shared, args=(1.5, ready))
    p.start()
    assert ready.wait(60)
    t0 = time.perf_counter()
    with exclusive_timing():
        waited = time.perf_counter() - t0
    p.join()
    assert waited > 0.8, f"timing started while another process was building ({waited:.2f} s)"


# --- end to end -------------------------------------------------------------------------------

@pytest.mark.slow
def test_tune_finds_the_front_writes_it_and_best_yaml_reproduces_the_winner(tmp_path):
    from optcc.api import apply

    space = space_file(tmp_path)
    out = tmp_path / "out"
    data, events = run(space, out)
    assert sorted(p.name for p in out.iterdir()) == ["best", "best.yaml", "pareto.html", "pareto.json"]
    assert json.loads((out / "pareto.json").read_text())["best"] == data["best"]
    assert data["counts"] == {"ok": 6, "pruned": 0, "failed": 0, "cached": 0}
    ok = [t for t in data["trials"] if t["status"] == "ok"]
    by_key = {t["key"]: t for t in ok}
    members = [by_key[k] for k in data["front"]]
    # the front (of the latencies measured during the search; its members are re-timed after):
    # no member is dominated by any timed trial, and the best is its fastest after re-timing
    searched = lambda t: t.get("search_latency", t["latency"])["p50_ms"]
    for m in members:
        for t in ok:
            assert not (searched(t) < searched(m)
                        and t["metrics"]["fidelity.cosine_mean"] > m["metrics"]["fidelity.cosine_mean"])
    assert data["best"] == min(members, key=lambda t: t["latency"]["p50_ms"])["key"]
    assert all(m.get("speedup") and m.get("search_latency") for m in members)  # re-timed beside eager
    assert data["baseline"]["backend"] == "torch-eager-fp32"
    assert "<svg" in (out / "pareto.html").read_text()
    progress = [d for k, d in events if k == "trial"]
    assert [d["done"] for d in progress] == [1, 2, 3, 4, 5, 6] and all("eta_s" in d for d in progress)
    # best.yaml is a normal recipe whose passes are the winning point, and apply rebuilds it
    best = by_key[data["best"]]
    report = json.loads((out / "best" / "report.json").read_text())
    assert (out / "best" / "recipe.lock.yaml").exists() and (out / "best" / "model.onnx").exists()
    passes = [next(iter(p)) if isinstance(p, dict) else p for p in yaml.safe_load((out / "best.yaml").read_text())["passes"]]
    assert passes == [p["name"] for p in report["passes"]]
    assert ("token_merge" in passes) == best["point"]["use.token_merge"]
    again = apply(out / "best.yaml", out=tmp_path / "again")
    assert [p["config"] for p in again["passes"]] == [p["config"] for p in report["passes"]]
    assert again["artifacts"][0]["sha256"] == report["artifacts"][0]["sha256"]


@pytest.mark.slow
def test_cheap_first_and_a_rerun_resumes_from_the_cache(tmp_path):
    # a budget only the untouched graph meets: every merged or quantized point misses it on the graph
    space = space_file(tmp_path, bound=">= 0.99999", extra=", retime: false")
    out = tmp_path / "out"
    try:  # an interrupted search: one trial done; it is cached whether or not it met the budget
        run(space, out, trials=1)
    except RequirementError:
        assert not out.exists()
    data, events = run(space, out)
    assert data["counts"]["cached"] == 1  # the trial of the first run was not run again
    pruned = [t for t in data["trials"] if t["status"] == "pruned"]
    assert pruned and all("latency" not in t and "artifact" not in t for t in pruned)
    artifacts = {p.name for p in (tmp_path / "cache" / "artifacts").iterdir() if not p.name.startswith(".")}
    assert not artifacts & {t["key"] for t in pruned}, "a trial outside the budget was built"
    submitted = [d["job"]["key"] for k, d in events if k == "submit"]
    assert len(submitted) == 5  # of 6 points, the cached one never reached a worker
    assert [t["status"] for t in data["trials"]].count("ok") == 1


@pytest.mark.slow
def test_a_budget_no_trial_meets_says_which_came_closest_and_writes_nothing(tmp_path):
    space = space_file(tmp_path, bound=">= 1.5")
    out = tmp_path / "out"
    with pytest.raises(RequirementError) as e:
        run(space, out)
    msg = e.value.one_line()
    assert "no trial met the budget" in msg and "fidelity.cosine_mean >= 1.5" in msg and "closest" in msg
    assert "use.token_merge=False, use.quantize=False" in msg  # the untouched graph is the closest
    assert not out.exists()


class _FakeRunner:
    """Answers each trial at once, cosine falling with r: the search logic without building models."""

    capacity = 1

    def __init__(self):
        self.done, self.submitted = [], []

    def submit(self, job):
        self.submitted.append(job["key"])
        cos = 1.0 - 0.001 * job["point"].get("token_merge.r", 0)
        self.done.append((job, {"point": job["point"], "key": job["key"], "status": "ok",
                                "metrics": {"fidelity.cosine_mean": cos}, "budget": [],
                                "latency": {"p50_ms": 10.0 - job["point"].get("token_merge.r", 0) * 0.1}}))

    def wait(self):
        out, self.done = self.done, []
        return out


@pytest.mark.parametrize("trials, expect", [(4, 4), (7, 7), (50, 7)])
def test_a_sampler_proposing_a_measured_point_again_does_not_use_up_a_trial(tmp_path, trials, expect):
    from optcc.search import run as tune_run

    import dataclasses

    space = load_space(space_file(tmp_path, passes="  - token_merge: {r: {range: [1, 7]}}", extra=", sampler: random"))
    space = dataclasses.replace(space, tune=dataclasses.replace(space.tune, trials=trials))
    runner = _FakeRunner()
    records = tune_run._search(space, "model", tune_run.TrialStore(tmp_path / "trials"), runner, lambda *a, **k: None)
    assert len(runner.submitted) == len(set(runner.submitted)) == expect  # 7 points in all: 50 trials stop at 7
    assert len(records) == expect


@pytest.mark.slow
def test_more_prefixes_than_a_worker_keeps_evicts_old_ones_but_never_the_captured_graph(tmp_path):
    from optcc.config.recipe import resolve_auto
    from optcc.search import trial

    passes = "  - token_merge: {r: {range: [1, 7]}}"
    space = load_space(space_file(tmp_path, passes=passes))
    ev = trial.Evaluator(space, "builtin:tiny-vit", None, None, tmp_path / "cache")
    for r in [*range(1, 8), 1]:  # 7 distinct one-pass prefixes, one more than kept, then the first again
        steps = resolve_auto(space.recipe({"token_merge.r": r}))[0].passes
        state = ev._graph(steps)
        assert state["records"][-1].name == "token_merge" and len(state["records"]) == 1
        assert len(ev.prefixes) <= trial.PREFIXES_KEPT
    assert ev._graph(())["gm"] is ev.root["gm"]


def _kill_workers_later(delay):
    def kill():
        time.sleep(delay)
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGKILL)

    threading.Thread(target=kill, daemon=True).start()


@pytest.mark.slow
def test_a_worker_that_dies_mid_trial_is_retried_once(tmp_path):
    from optcc.api import tune

    space = space_file(tmp_path, extra=", retime: false", passes=TWO)
    kills = []

    def event(kind, **d):
        if kind == "submit" and not kills:  # once: every trial in flight dies with its worker
            kills.append(d["job"]["key"])
            _kill_workers_later(1.0)

    data = tune(space, out=tmp_path / "out", workers=2, cache=tmp_path / "cache", on_event=event)
    assert data["counts"]["ok"] == 2 and data["counts"]["failed"] == 0


@pytest.mark.slow
def test_a_worker_that_dies_twice_fails_its_trial_and_the_run_goes_on(tmp_path):
    from optcc.api import tune

    space = space_file(tmp_path, extra=", retime: false", passes=TWO)
    submits = []

    def event(kind, **d):
        if kind == "submit":
            submits.append((d["job"]["key"], d["attempt"]))
            _kill_workers_later(1.0)

    with pytest.raises(RequirementError, match="no trial of .* finished: 2 failed.*died.*twice"):
        tune(space, out=tmp_path / "out", workers=2, cache=tmp_path / "cache", on_event=event)
    assert sorted(a for _, a in submits) == [1, 1, 2, 2]  # each trial: tried, then retried once
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_tune_on_a_local_ray_cluster(tmp_path):
    pytest.importorskip("ray")
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        data, _ = run(space_file(tmp_path, extra=", retime: false", passes=TWO), tmp_path / "out",
                      ray=cluster.address, workers=2)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert data["executor"] == "ray" and data["counts"]["ok"] == 2
    workers = {t["worker"] for t in data["trials"]}
    assert all(str(os.getpid()) not in w for w in workers)  # the trials ran in Ray's worker processes
    best = next(t for t in data["trials"] if t["key"] == data["best"])
    assert Path(best["artifact"]).exists()  # brought back to this machine's cache
    assert (tmp_path / "out" / "best" / "model.onnx").exists()


def test_an_unreachable_ray_address_is_one_line_and_writes_nothing(tmp_path):
    pytest.importorskip("ray")
    space = space_file(tmp_path)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "optcc.cli", "tune", str(space), "-o", str(out), "--ray", "127.0.0.1:9",
                        "--cache", str(tmp_path / "cache")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "--ray 127.0.0.1:9: no Ray cluster answers there" in lines[0]
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_cli_bad_space_exits_2_with_one_line(tmp_path):
    space = write_recipe(tmp_path, "version: 1\npasses: [{quantize: {scheme: {range: [1, 2]}}}]\n"
                                   "require: {fidelity.cosine_mean: '>= 0.9'}\n")
    r = subprocess.run([sys.executable, "-m", "optcc.cli", "tune", str(space), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "passes[0].quantize.scheme" in r.stderr
    assert not (tmp_path / "out").exists()
