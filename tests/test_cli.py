import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST_RECIPE, ROOT, write_recipe


def optcc(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "optcc", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=600)


def test_apply_json_stdout_is_the_report(tmp_path, fast_recipe):
    p = optcc("apply", fast_recipe, "builtin:tiny-vit", "-o", tmp_path / "out", "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert p.stdout.strip() == (tmp_path / "out" / "report.json").read_text().strip()
    assert report["artifacts"] and all(not Path(a["path"]).is_absolute() for a in report["artifacts"])
    assert "\x1b[" not in p.stderr  # no colour codes when not a TTY


def test_apply_renders_tables(tmp_path, fast_recipe):
    p = optcc("apply", fast_recipe, "builtin:tiny-vit", "-o", tmp_path / "out")
    assert p.returncode == 0, p.stderr
    assert "latency" in p.stdout and "fidelity vs original" in p.stdout and "cleanup" in p.stdout


@pytest.mark.parametrize("recipe_text, model, code, msg", [
    ("version: 1\nbench: {iter: 3}\n", "builtin:tiny-vit", 2, "did you mean 'iters'"),
    ("", "builtin:tiny-vit", 2, "the recipe is empty"),
    (FAST_RECIPE, "no/such/model", 3, "no such file or folder"),
    (FAST_RECIPE, "builtin:tiny-vitt", 3, "did you mean 'tiny-vit'"),
    (FAST_RECIPE + "require: {speedup: '>= 1000'}\n", "builtin:tiny-vit", 7, "speedup >= 1000 not met"),
])
def test_exit_codes(tmp_path, recipe_text, model, code, msg):
    rec = write_recipe(tmp_path, recipe_text)
    out = tmp_path / "out"
    p = optcc("apply", rec, model, "-o", out)
    assert p.returncode == code, p.stderr
    assert msg in p.stderr
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert out.exists() == (code == 7)  # only an unmet requirement leaves its (complete) report


def test_pickle_weights_exit_code(tmp_path):
    import torch

    torch.save({"x": 1}, tmp_path / "w.pt")
    p = optcc("apply", write_recipe(tmp_path, FAST_RECIPE), str(tmp_path / "w.pt"), "-o", tmp_path / "o")
    assert p.returncode == 3 and "pickle checkpoint" in p.stderr


def test_debug_shows_traceback(tmp_path):
    p = optcc("apply", write_recipe(tmp_path, FAST_RECIPE), "no/such", "-o", tmp_path / "o", "--debug")
    assert p.returncode == 3 and "Traceback" in p.stderr


def test_validate_passes_inspect_schema(tmp_path):
    p = optcc("validate", ROOT / "recipes" / "quickstart.yaml")
    assert p.returncode == 0 and "ok" in p.stdout
    p = optcc("validate", write_recipe(tmp_path, "version: 1\npasses: [{clean: {}}]\n"))
    assert p.returncode == 2 and "did you mean 'cleanup'" in p.stderr
    p = optcc("passes", "--json")
    assert any(x["name"] == "cleanup" for x in json.loads(p.stdout))
    p = optcc("inspect", "builtin:tiny-gpt2", "--json")
    s = json.loads(p.stdout)["structure"]
    assert s["container"] == "transformer.h" and len(s["blocks"]) == 4
    p = optcc("inspect", "builtin:tiny-bert")
    assert p.returncode == 0 and "encoder.layer.0" in p.stdout
    p = optcc("schema")
    assert json.loads(p.stdout)["title"] == "optcc recipe"


def test_every_shipped_recipe_validates():
    for rec in sorted((ROOT / "recipes").glob("*.yaml")):
        p = optcc("validate", rec)
        assert p.returncode == 0, (rec, p.stderr)
        # the tune spaces are checked as search spaces, everything else as a recipe
        assert ("a search space" in p.stdout) == rec.name.startswith("tune-"), (rec, p.stdout)


def test_validate_a_bad_search_space_is_one_line(tmp_path):
    bad = tmp_path / "space.yaml"
    bad.write_text("version: 1\ntune: {trials: 4}\npasses: [{quantize: {scheme: {range: [1, 2]}}}]\n"
                   "require: {fidelity.cosine_mean: '>= 0.9'}\n")
    p = optcc("validate", bad)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "scheme" in p.stderr, p.stderr
