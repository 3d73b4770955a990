"""Data sources for calibration and evaluation, resolved from recipe strings.

    auto            the built-in data of a built-in model (digits, stdlib text, the sentence set),
                    else random inputs (calibration) / no task metric (evaluation)
    random          random inputs shaped like the example inputs (calibration only)
    builtin:NAME    the shipped data of a built-in: vit-digits | byte-llama | sentences
    text-file:PATH  UTF-8 text → next-token windows (byte-level models, or the model folder's tokenizer)
    jsonl:PATH      {"text": ..., "group": ...} lines → sentence batches (embedding metric)
    safetensors:PATH  tensors named like the model inputs plus `labels` (accuracy)
    tokens:PATH     a safetensors file with one 1-D integer tensor `input_ids` (already tokenized
                    text) → next-token windows (perplexity)
    images:FOLDER   FOLDER/<class>/<image>.png|jpg (needs Pillow: pip install optcc[images]) →
                    resized, normalised pixels (accuracy); class folders map to the model's
                    label2id when their names match it, else to sorted order

Every batch has exactly the example inputs' batch size and sequence length, so
graphs captured with static shapes can run them too.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from optcc.errors import RecipeError
from optcc.intake.load import LoadedModel, make_inputs
from optcc.config.recipe import Recipe
from optcc.zoo import data as zoo

SENTENCES = zoo.zoo_dir() / "sentences.jsonl"


@dataclass
class Dataset:
    kind: str  # "images" | "text" | "sentences" | "tensors" | "random"
    source: str
    batches: list[dict[str, torch.Tensor]]
    labels: list[torch.Tensor] = field(default_factory=list)  # per batch: class ids [B] or next-token ids [B, T]
    groups: Optional[torch.Tensor] = None  # paraphrase group per sentence [N]

    @property
    def samples(self) -> int:
        return sum(next(iter(b.values())).shape[0] for b in self.batches)


def _default_source(lm: LoadedModel) -> Optional[str]:
    if lm.zoo:
        return f"builtin:{lm.zoo}"
    if lm.name == "minilm" or lm.source == "builtin:minilm":
        return "builtin:sentences"
    return None


def load_dataset(spec: str, lm: LoadedModel, example: dict[str, torch.Tensor], limit: int, split: str) -> Dataset:
    """Resolve a source string into batches shaped like `example`. split: eval | calib."""
    batch = next(iter(example.values())).shape[0]
    kind, _, arg = spec.partition(":")
    if kind == "builtin":
        if arg == "vit-digits":
            pixels, labels = zoo.load_digits_split(arg, split)
            return _image_batches(spec, pixels, labels, example, batch, limit)
        if arg == "byte-llama":
            return _text_batches(spec, zoo.load_text_split(arg, split), lm, example, batch, limit)
        if arg == "sentences":
            return _sentence_batches(spec, SENTENCES, lm, example, batch, limit)
        raise RecipeError(f"{spec}: no such built-in data set", "use builtin:vit-digits, builtin:byte-llama or builtin:sentences")
    path = Path(arg)
    if kind in ("text-file", "jsonl", "safetensors", "tokens", "images") and not path.exists():
        raise RecipeError(f"{spec}: no such file or folder", f"check the path given to {kind}:")
    if kind == "text-file":
        return _text_batches(spec, path.read_text(encoding="utf-8", errors="replace"), lm, example, batch, limit)
    if kind == "tokens":
        return _token_batches(spec, _token_file(spec, path), example, batch, limit)
    if kind == "images":
        pixels, labels = _image_folder(spec, path, lm, example)
        return _image_batches(spec, pixels, labels, example, batch, limit)
    if kind == "jsonl":
        return _sentence_batches(spec, path, lm, example, batch, limit)
    if kind == "safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        missing = [k for k in example if k not in tensors]
        if missing or "labels" not in tensors:
            raise RecipeError(f"{spec}: needs tensors {sorted(example)} and labels, has {sorted(tensors)}",
                              "save the inputs under the model's input names plus `labels`")
        n = (min(limit, tensors["labels"].shape[0]) // batch) * batch
        batches = [{k: tensors[k][i:i + batch] for k in example} for i in range(0, n, batch)]
        return Dataset("tensors", spec, batches, [tensors["labels"][i:i + batch] for i in range(0, n, batch)])
    raise RecipeError(f"'{spec}' is not a data source",
                      "use auto, random, builtin:NAME, text-file:PATH, tokens:PATH, jsonl:PATH, safetensors:PATH or images:FOLDER")


def _image_batches(spec, pixels, labels, example, batch, limit) -> Dataset:
    key = next(iter(example))
    want = tuple(example[key].shape[1:])
    if tuple(pixels.shape[1:]) != want:
        raise RecipeError(f"{spec}: images are {tuple(pixels.shape[1:])} but the model takes {want}",
                          "set model.inputs.image_size to match, or use a matching data set")
    n = (min(limit, pixels.shape[0]) // batch) * batch
    if n == 0:
        raise RecipeError(f"{spec}: fewer samples than one batch of {batch}", "lower model.inputs.batch")
    return Dataset("images", spec, [{key: pixels[i:i + batch]} for i in range(0, n, batch)],
                   [labels[i:i + batch] for i in range(0, n, batch)])


def _tokenize(lm: LoadedModel, text: str) -> torch.Tensor:
    if lm.config.get("vocab_size") == 256:
        return zoo.byte_encode(text)
    tok = _tokenizer(lm)
    return torch.tensor(tok(text)["input_ids"], dtype=torch.long)


def _tokenizer(lm: LoadedModel):
    folder = _model_folder(lm)
    if folder is None or not (folder / "tokenizer_config.json").exists() and not (folder / "tokenizer.json").exists():
        raise RecipeError(f"{lm.source}: no tokenizer to turn text into tokens",
                          "use a model folder that ships its tokenizer, or a byte-level model")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _model_folder(lm: LoadedModel) -> Optional[Path]:
    if lm.source.startswith("builtin:"):
        from optcc.intake import builtin

        built = builtin.resolve(lm.source.split(":", 1)[1]).build
        out = built()
        return out if isinstance(out, Path) else None
    p = Path(lm.source)
    return p if p.is_dir() else None


def _text_batches(spec, text, lm, example, batch, limit) -> Dataset:
    if "input_ids" not in example or example["input_ids"].dim() != 2:
        raise RecipeError(f"{spec}: text needs a model with input_ids", "use a data source that fits the model's inputs")
    return _token_batches(spec, _tokenize(lm, text), example, batch, limit)


def _token_batches(spec, ids: torch.Tensor, example, batch, limit) -> Dataset:
    """ids: [N] token ids → batches of [batch, seq] inputs with next-token labels."""
    if "input_ids" not in example or example["input_ids"].dim() != 2:
        raise RecipeError(f"{spec}: tokens need a model with input_ids", "use a data source that fits the model's inputs")
    seq = example["input_ids"].shape[1]
    windows = [w for w in zoo.lm_windows(ids, seq) if w.numel() == seq + 1]
    n = (min(limit, len(windows)) // batch) * batch
    if n == 0:
        raise RecipeError(f"{spec}: too short for one batch of {batch} x {seq + 1} tokens",
                          "give more text or lower model.inputs.batch / seq_len")
    stacked = torch.stack(windows[:n])
    batches = [{"input_ids": stacked[i:i + batch, :-1]} for i in range(0, n, batch)]
    return Dataset("text", spec, batches, [stacked[i:i + batch, 1:] for i in range(0, n, batch)])


def _token_file(spec, path: Path) -> torch.Tensor:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise RecipeError(f"{spec}: not a readable safetensors file ({e})",
                          "save the ids with safetensors.torch.save_file({'input_ids': ids}, PATH)") from e
    ids = tensors.get("input_ids")
    if ids is None or ids.dim() != 1 or ids.is_floating_point():
        raise RecipeError(f"{spec}: needs one 1-D integer tensor named input_ids, has "
                          + ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in tensors.items()),
                          "save the token ids of the text, concatenated, as input_ids")
    return ids.long()


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def _image_folder(spec, root: Path, lm: LoadedModel, example) -> tuple[torch.Tensor, torch.Tensor]:
    """root/<class>/<image> → pixels [N, C, H, W] (the example's shape, normalised as the model's
    preprocessor says, else mean 0.5 / std 0.5) and class ids [N]."""
    try:
        from PIL import Image
    except ImportError as e:
        raise RecipeError(f"{spec}: reading images needs Pillow", "pip install 'optcc[images]' (or pillow)") from e
    key = next(iter(example))
    if example[key].dim() != 4:
        raise RecipeError(f"{spec}: images need a model that takes pixel_values [B, C, H, W]", "use another data source")
    _, c, h, w = example[key].shape
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise RecipeError(f"{spec}: expected a folder of class folders (FOLDER/<class>/<image>.png)", "arrange the images that way")
    label2id = {str(k): int(v) for k, v in (lm.config.get("label2id") or {}).items()}
    ids = {name: label2id[name] for name in classes} if label2id and all(n in label2id for n in classes) \
        else {name: i for i, name in enumerate(classes)}
    prep = _preprocessor(lm)
    mean = torch.tensor(prep.get("image_mean", [0.5] * c), dtype=torch.float32).reshape(c, 1, 1)
    std = torch.tensor(prep.get("image_std", [0.5] * c), dtype=torch.float32).reshape(c, 1, 1)
    pixels, labels = [], []
    for name in classes:
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    im = im.convert("RGB" if c == 3 else "L").resize((w, h), Image.BILINEAR)
                    t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(h, w, c)
            except OSError as e:
                raise RecipeError(f"{spec}: cannot read {f} ({e})", "remove or fix that file") from e
            pixels.append((t.permute(2, 0, 1).float() / 255.0 - mean) / std)
            labels.append(ids[name])
    if not pixels:
        raise RecipeError(f"{spec}: no images found in {', '.join(classes)}", f"use files ending in {', '.join(sorted(_IMAGE_SUFFIXES))}")
    return torch.stack(pixels), torch.tensor(labels)


def _preprocessor(lm: LoadedModel) -> dict:
    folder = _model_folder(lm)
    f = folder / "preprocessor_config.json" if folder else None
    return json.loads(f.read_text()) if f and f.exists() else {}


def _sentence_batches(spec, path: Path, lm, example, batch, limit) -> Dataset:
    rows = []
    for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            rows.append((str(obj["text"]), int(obj.get("group", k))))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise RecipeError(f"{path}:{k}: expected {{\"text\": ..., \"group\": int}}", "fix that line") from e
    seq = example["input_ids"].shape[1]
    tok = _tokenizer(lm)
    n = (min(limit, len(rows)) // batch) * batch
    if n == 0:
        raise RecipeError(f"{spec}: fewer sentences than one batch of {batch}", "add sentences or lower model.inputs.batch")
    enc = tok([t for t, _ in rows[:n]], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    batches = []
    for i in range(0, n, batch):
        b = {k: enc[k][i:i + batch] for k in example if k in enc}
        if set(b) != set(example):
            raise RecipeError(f"{spec}: the tokenizer gives {sorted(enc)}, the model takes {sorted(example)}",
                              "use a data source that fits the model's inputs")
        batches.append(b)
    groups = torch.tensor([g for _, g in rows[:n]])
    return Dataset("sentences", spec, batches, groups=groups)


def calibration(lm: LoadedModel, recipe: Recipe, example: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Calibration batches (inputs only) per the recipe's calibration section."""
    cal = recipe.calibration
    spec = cal.source if cal.source != "auto" else (_default_source(lm) or "random")
    batch = next(iter(example.values())).shape[0]
    if spec == "random":
        n = max(1, -(-cal.samples // batch))
        return [make_inputs(lm, recipe.model.inputs, seed=cal.seed + 1 + i) for i in range(n)]
    return load_dataset(spec, lm, example, max(cal.samples, batch), "calib").batches


def evaluation(lm: LoadedModel, recipe: Recipe, example: dict[str, torch.Tensor]) -> Optional[Dataset]:
    """The evaluation set per the recipe's evaluate section; None when there is none to use."""
    ev = recipe.evaluate
    if ev is None:
        spec = _default_source(lm)
        return load_dataset(spec, lm, example, 256, "eval") if spec else None
    spec = ev.source if ev.source != "auto" else _default_source(lm)
    if spec is None:
        raise RecipeError(f"evaluate.source: {lm.source} ships no evaluation data",
                          "set evaluate.source to text-file:PATH, tokens:PATH, jsonl:PATH, safetensors:PATH or images:FOLDER")
    return load_dataset(spec, lm, example, ev.samples, "eval")
