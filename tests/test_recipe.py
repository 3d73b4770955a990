import json

import pytest

from optcc.errors import RecipeError
from optcc.config.recipe import load_recipe, parse_recipe, recipe_json_schema

GOOD = """
version: 1
model:
  source: builtin:tiny-vit
  task: image-classification
  inputs: {batch: 4, image_size: 32}
passes:
  - cleanup: {dropout: true}
  - cleanup
emit: {formats: [onnx], opset: 18}
bench: {backends: [onnxruntime], iters: 5, min_seconds: 0.5, threads: 2}
require: {speedup: ">= 1.5", fidelity.cosine_mean: ">= 0.99"}
"""


def test_good_recipe_resolves_defaults():
    r = parse_recipe(GOOD, "good.yaml")
    assert r.model.inputs.batch == 4 and r.model.inputs.image_size == 32
    assert [s.name for s in r.passes] == ["cleanup", "cleanup"]
    assert r.passes[1].config.casts is True  # defaults filled
    assert r.emit.formats == ("onnx",)
    assert r.bench.warmup == 3  # default
    assert r.require["speedup"] == ">= 1.5"
    d = r.to_dict()
    assert d["passes"][0] == {"cleanup": {"dropout": True, "casts": True, "asserts": True}}


def test_round_trip_through_lock(tmp_path):
    import yaml

    r = parse_recipe(GOOD, "good.yaml")
    again = parse_recipe(yaml.safe_dump(r.to_dict()), "again.yaml")
    assert again.to_dict() == r.to_dict()


@pytest.mark.parametrize("text, expected", [
    ("version: 1\nmodel: [1, 2\n", "not valid YAML"),
    ("", "the recipe is empty"),
    ("- a\n- b\n", "must be a mapping of sections, got a list"),
    ("model: {}\n", "missing 'version: 1'"),
    ("version: 2\n", "unsupported recipe version 2"),
    ("version: 1\nbenh: {}\n", "did you mean 'bench'?"),
    ("version: 1\nbench: {iter: 3}\n", "did you mean 'iters'?"),
    ("version: 1\nbench: {iters: three}\n", "bench.iters: expected an integer, got str 'three'"),
    ("version: 1\nemit: {formats: [onnx, tflite]}\n", "'tflite' is not one of onnx, torch, exported"),
    ("version: 1\npasses:\n  - clenup: {}\n", "did you mean 'cleanup'?"),
    ("version: 1\npasses:\n  - cleanup: {dropuot: false}\n", "did you mean 'dropout'?"),
    ("version: 1\npasses: {cleanup: {}}\n", "expected a list of passes"),
    ("version: 1\npasses:\n  - {cleanup: {}, other: {}}\n", "one-key mapping"),
    ("version: 1\nmodel: {task: image-clasification}\n", "did you mean 'image-classification'?"),
    ("version: 1\nmodel: {inputs: {batch: 0}}\n", "batch must be >= 1"),
    ("version: 1\nrequire: {speedup: 'fast'}\n", "cannot parse 'fast'"),
    ("version: 1\nbench: [1]\n", "bench: expected a mapping, got a list"),
    ("version: 1\nrequire: {speedup: '>= 1.2.3'}\n", "cannot parse '>= 1.2.3'"),
    ("version: 1\nrequire: {speedup: '>= .'}\n", "cannot parse '>= .'"),
    ("version: 1\nbench: {iters: 0}\n", "iters must be >= 1"),
    ("version: 1\nbench: {warmup: -1}\n", "warmup must be >= 0"),
    ("version: 1\nbench: {min_seconds: -2}\n", "min_seconds must be >= 0"),
    ("version: 1\nbench: {threads: 0}\n", "threads must be >= 1"),
    ("version: 1\nemit: {opset: 3}\n", "opset must be between 14 and 23"),
    ("version: 1\ncalibration: {samples: 0}\n", "samples must be >= 1"),
])
def test_bad_recipes(text, expected):
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "bad.yaml")
    assert expected in e.value.one_line()
    assert e.value.one_line().startswith("bad.yaml")  # names the file
    assert "\n" not in e.value.one_line()


def test_error_names_the_yaml_line():
    with pytest.raises(RecipeError) as e:
        parse_recipe("version: 1\nbench:\n  warmup: 1\n  itres: 3\n", "r.yaml")
    assert e.value.message.startswith("r.yaml:4: bench.itres")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="is a folder"):
        load_recipe(tmp_path)


def test_json_schema_is_generated_from_the_models():
    s = recipe_json_schema()
    json.dumps(s)
    assert s["properties"]["bench"]["properties"]["iters"]["default"] == 10
    assert s["properties"]["bench"]["additionalProperties"] is False
    names = [next(iter(i["properties"])) for i in s["properties"]["passes"]["items"]["anyOf"] if "properties" in i]
    assert "cleanup" in names


def test_published_schema_is_current():
    from pathlib import Path

    published = Path(__file__).resolve().parent.parent / "docs" / "recipe.schema.json"
    assert json.loads(published.read_text()) == recipe_json_schema(), "regenerate: optcc schema > docs/recipe.schema.json"
