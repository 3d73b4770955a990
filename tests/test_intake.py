import sys

import pytest
import torch

from conftest import HANDWRITTEN
from optcc.errors import IntakeError
from optcc.intake.load import load_model, make_inputs
from optcc.config.recipe import Inputs


def test_builtin():
    lm = load_model("builtin:tiny-bert")
    assert lm.task == "feature-extraction"
    inp = make_inputs(lm, Inputs(batch=3, seq_len=10))
    assert inp["input_ids"].shape == (3, 10) and inp["attention_mask"].shape == (3, 10)
    assert len(lm.weights_sha256) == 64


def test_builtin_unknown_suggests():
    with pytest.raises(IntakeError, match="did you mean 'tiny-vit'"):
        load_model("builtin:tiny-vitt")


def test_hf_folder_task_inferred(tmp_path):
    load_model("builtin:tiny-llama").module.save_pretrained(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"))
    assert lm.task == "text-generation"
    assert make_inputs(lm, Inputs(batch=2, seq_len=8))["input_ids"].shape == (2, 8)


def test_hf_folder_same_weights_hash(tmp_path):
    a = load_model("builtin:tiny-vit")
    a.module.save_pretrained(tmp_path / "v")
    b = load_model(str(tmp_path / "v"))
    assert a.weights_sha256 == b.weights_sha256


def test_pt2(tmp_path):
    lm = load_model("builtin:tiny-vit")
    inp = make_inputs(lm, Inputs(batch=2))
    ep = torch.export.export(lm.module, (), inp, strict=False)
    torch.export.save(ep, tmp_path / "m.pt2")
    got = load_model(str(tmp_path / "m.pt2"), task="image-classification")
    assert set(make_inputs(got, Inputs())) == {"pixel_values"}
    with pytest.raises(IntakeError, match="pass --task"):
        load_model(str(tmp_path / "m.pt2"))


def test_file_factory():
    lm = load_model(f"{HANDWRITTEN}:build", task="feature-extraction")
    assert lm.task == "feature-extraction"
    assert make_inputs(lm, Inputs(batch=2, seq_len=5))["input_ids"].max() < 100


def test_factory_with_own_inputs():
    lm = load_model(f"{HANDWRITTEN}:build_tensor")
    assert lm.task == "tensor" and lm.example_inputs["input"].shape == (4, 16)


def test_module_factory_and_weights(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    (tmp_path / "mypkg_models.py").write_text(
        "import torch\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(4, 2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    save_file({"0.weight": torch.ones(2, 4), "0.bias": torch.zeros(2)}, tmp_path / "w.safetensors")
    lm = load_model("mypkg_models:build", task="tensor", weights=str(tmp_path / "w.safetensors"))
    assert torch.equal(lm.module[0].weight, torch.ones(2, 4))
    sys.modules.pop("mypkg_models", None)


def test_weights_that_do_not_fit(tmp_path):
    from safetensors.torch import save_file

    save_file({"nope.weight": torch.ones(2, 4)}, tmp_path / "w.safetensors")
    with pytest.raises(IntakeError, match="does not fit") as e:
        load_model(f"{HANDWRITTEN}:build", task="feature-extraction", weights=str(tmp_path / "w.safetensors"))
    assert "\n" not in e.value.one_line()


@pytest.mark.parametrize("content", [b"not a zip at all", None])
def test_corrupt_pt2_is_one_line(tmp_path, content, capfd):
    import zipfile

    p = tmp_path / "m.pt2"
    if content is None:  # a zip, but not a torch.export archive
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("m/data.pkl", "junk")
    else:
        p.write_bytes(content)
    with pytest.raises(IntakeError, match="torch.export archive"):
        load_model(str(p), task="image-classification")
    assert "Traceback" not in capfd.readouterr().err


def test_pickle_checkpoint_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(IntakeError, match="convert it to safetensors"):
        load_model(f"{HANDWRITTEN}:build", task="feature-extraction", weights=str(tmp_path / "evil.pt"))
    with pytest.raises(IntakeError, match="pickle checkpoint"):
        load_model(str(tmp_path / "evil.pt"))


def test_hf_folder_with_only_pickle_weights_refused(tmp_path):
    m = load_model("builtin:tiny-bert").module
    m.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(m.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(IntakeError, match="pickle weights are not loaded"):
        load_model(str(tmp_path / "m"))


def test_corrupt_safetensors(tmp_path):
    load_model("builtin:tiny-bert").module.save_pretrained(tmp_path / "m")
    p = tmp_path / "m" / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(IntakeError, match="corrupt or unreadable safetensors"):
        load_model(str(tmp_path / "m"))


@pytest.mark.parametrize("source, msg", [
    ("does/not/exist", "no such file or folder"),
    ("missing.py:build", "no such file"),
    (f"{HANDWRITTEN}:nope", "'nope' is not a function"),
    ("no_such_pkg_xyz.mod:build", "cannot import"),
])
def test_bad_sources(source, msg):
    with pytest.raises(IntakeError, match=msg):
        load_model(source, task="feature-extraction")


def test_seq_len_beyond_positions():
    lm = load_model("builtin:tiny-llama")
    with pytest.raises(IntakeError, match="exceeds the model's 256 positions"):
        make_inputs(lm, Inputs(seq_len=1000))
