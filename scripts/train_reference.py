#!/usr/bin/env python
"""Train the reference models shipped in ``optcc/zoo`` (CPU, 2 threads, fixed seeds).

    python scripts/train_reference.py                 # both models -> optcc/zoo/
    python scripts/train_reference.py --only vit      # vit-digits only
    python scripts/train_reference.py --only lm --out /tmp/zoo

vit-digits : transformers ViTForImageClassification on sklearn load_digits()
             (8x8 -> 32x32), fixed stratified 25% held-out split.
byte-llama : transformers LlamaForCausalLM over raw UTF-8 bytes, trained on the
             Python standard library's own top-level .py sources.

Each model folder gets fp16 safetensors weights, config, eval/calib data,
metrics.json (held-out metric measured on the saved fp16 weights reloaded as
float32) and CARD.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pathlib
import platform
import sys
import sysconfig
import time

import torch
import torch.nn.functional as F

REPO = pathlib.Path(__file__).resolve().parent.parent
DATA_PY = REPO / "optcc" / "zoo" / "data.py"


def _load_data_module():
    """Import optcc/zoo/data.py by file path (works whether or not optcc is a package)."""
    spec = importlib.util.spec_from_file_location("optcc_zoo_data", DATA_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


zdata = _load_data_module()

THREADS = 2


def _setup(seed: int) -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def _param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, torch.set_num_threads({THREADS}), torch {torch.__version__}, Python {platform.python_version()}"


def _cosine_lr(step: int, total: int, warmup: int, peak: float, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def _save_fp16(model, out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):
        if old.name.startswith("model"):
            old.unlink()
    model.to(torch.float16).save_pretrained(str(out))
    model.to(torch.float32)


def _chmod_files(out: pathlib.Path) -> None:
    for f in out.iterdir():
        if f.is_file():
            f.chmod(0o644)


def _median(xs) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def _write_json(path: pathlib.Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- ViT


VIT_SEED = 0
VIT_EPOCHS = 40
VIT_BATCH = 64
VIT_LR = 1e-3
VIT_WD = 0.05
VIT_MAX_SHIFT = 3  # pixels in the 32x32 image
VIT_TEST_FRAC = 0.25
VIT_N_CALIB = 64


def _shift_batch(x: torch.Tensor, g: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random integer translations of [B,C,H,W] images, background filled with -1 (raw 0)."""
    b, _, h, w = x.shape
    bg = (0.0 - zdata.DIGITS_MEAN) / zdata.DIGITS_STD
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=bg)
    dy = torch.randint(0, 2 * p + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=g)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


@torch.no_grad()
def eval_vit(model, pixels: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch):
        logits = model(pixel_values=pixels[i:i + batch]).logits
        correct += (logits.argmax(-1) == labels[i:i + batch]).sum().item()
    return correct / len(labels)


def train_vit(out_root: pathlib.Path) -> dict:
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

    _setup(VIT_SEED)
    out = out_root / "vit-digits"
    t0 = time.time()

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.uint8)        # [1797,8,8], 0..16
    labels = torch.tensor(d.target, dtype=torch.long)
    idx = list(range(len(labels)))
    tr_idx, te_idx = train_test_split(idx, test_size=VIT_TEST_FRAC, random_state=VIT_SEED,
                                      stratify=d.target)
    tr_idx, te_idx = sorted(tr_idx), sorted(te_idx)
    x_tr, y_tr = zdata.digits_to_pixels(images[tr_idx]), labels[tr_idx]

    # calibration: 64 training images, first ones of a seeded permutation
    g_cal = torch.Generator().manual_seed(VIT_SEED + 1)
    cal_idx = [tr_idx[i] for i in torch.randperm(len(tr_idx), generator=g_cal)[:VIT_N_CALIB].tolist()]

    config = ViTConfig(
        image_size=32, patch_size=4, num_channels=3,
        hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=256,
        hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-12, qkv_bias=True,
        num_labels=10,
        id2label={i: str(i) for i in range(10)}, label2id={str(i): i for i in range(10)},
    )
    model = ViTForImageClassification(config)
    n_params = _param_count(model)

    opt = torch.optim.AdamW(model.parameters(), lr=VIT_LR, weight_decay=VIT_WD, betas=(0.9, 0.999))
    g = torch.Generator().manual_seed(VIT_SEED + 2)
    steps_per_epoch = math.ceil(len(y_tr) / VIT_BATCH)
    total = VIT_EPOCHS * steps_per_epoch
    step = 0
    step_times = []
    for epoch in range(VIT_EPOCHS):
        model.train()
        perm = torch.randperm(len(y_tr), generator=g)
        tot_loss = 0.0
        for i in range(0, len(y_tr), VIT_BATCH):
            ts = time.perf_counter()
            bi = perm[i:i + VIT_BATCH]
            xb = _shift_batch(x_tr[bi], g, VIT_MAX_SHIFT)
            for pg in opt.param_groups:
                pg["lr"] = _cosine_lr(step, total, warmup=steps_per_epoch * 2, peak=VIT_LR, floor=0.02)
            logits = model(pixel_values=xb).logits
            loss = F.cross_entropy(logits, y_tr[bi], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            tot_loss += loss.item() * len(bi)
            step += 1
            step_times.append(time.perf_counter() - ts)
        if epoch % 5 == 4 or epoch == VIT_EPOCHS - 1:
            print(f"[vit] epoch {epoch + 1}/{VIT_EPOCHS} loss {tot_loss / len(y_tr):.4f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    train_s = time.time() - t0

    _save_fp16(model, out)
    save_file({"images": images[te_idx].contiguous(), "labels": labels[te_idx].contiguous()},
              str(out / "eval.safetensors"))
    save_file({"images": images[cal_idx].contiguous(), "labels": labels[cal_idx].contiguous()},
              str(out / "calib.safetensors"))

    # metric: the shipped fp16 weights, loaded as float32, on the shipped eval file
    reloaded = AutoModelForImageClassification.from_pretrained(str(out), dtype=torch.float32)
    px, lb = zdata.load_digits_split("vit-digits", "eval") if out_root.resolve() == zdata.zoo_dir() \
        else (zdata.digits_to_pixels(images[te_idx]), labels[te_idx])
    acc = eval_vit(reloaded, px, lb)
    acc_fp32_train = eval_vit(model, zdata.digits_to_pixels(images[te_idx]), labels[te_idx])
    train_acc = eval_vit(reloaded, x_tr, y_tr)
    print(f"[vit] held-out top-1 {acc:.4f} (fp32 in-memory {acc_fp32_train:.4f}), "
          f"train {train_acc:.4f}, {train_s:.0f}s", flush=True)

    metrics = {
        "model": "vit-digits",
        "task": "image-classification",
        "metric": "top1_accuracy",
        "heldout_top1_accuracy": round(acc, 6),
        "heldout_correct": int(round(acc * len(te_idx))),
        "heldout_size": len(te_idx),
        "train_top1_accuracy": round(train_acc, 6),
        "train_size": len(tr_idx),
        "calib_size": len(cal_idx),
        "weights_dtype": "float16",
        "evaluated_as": "fp16 weights loaded with dtype=torch.float32",
        "parameters": n_params,
        "train_seconds": round(train_s, 1),
        "median_step_seconds": round(_median(step_times), 4),
        "train_steps": len(step_times),
        "batch_size": VIT_BATCH,
        "seed": VIT_SEED,
        "epochs": VIT_EPOCHS,
        "protocol": "pixels = optcc.zoo.data.digits_to_pixels(eval.safetensors['images']); "
                    "accuracy of argmax(logits) vs eval.safetensors['labels']",
    }
    _write_json(out / "metrics.json", metrics)
    _write_vit_card(out, config, metrics)
    _chmod_files(out)
    return metrics


def _write_vit_card(out: pathlib.Path, config, m: dict) -> None:
    text = f"""# vit-digits

Reference image classifier shipped with optcc (generated by `scripts/train_reference.py`).

## Architecture
`transformers.ViTForImageClassification` (model_type `vit`), trained from scratch.

| field | value |
|---|---|
| image_size / patch_size | {config.image_size} / {config.patch_size} (64 patch tokens + CLS = 65 tokens) |
| num_channels | {config.num_channels} |
| hidden_size | {config.hidden_size} |
| num_hidden_layers | {config.num_hidden_layers} |
| num_attention_heads | {config.num_attention_heads} |
| intermediate_size | {config.intermediate_size} |
| hidden_act | {config.hidden_act} |
| num_labels | 10 (id2label "0".."9") |
| parameters | {m['parameters']:,} |
| weights | `model.safetensors`, float16 |

## Data and split
scikit-learn's bundled `load_digits()` (1797 8x8 grayscale images, values 0..16; no download).
Fixed stratified split: `train_test_split(test_size=0.25, random_state=0, stratify=target)`
-> {m['train_size']} train / {m['heldout_size']} held-out images.

Preprocessing (`optcc/zoo/data.py::digits_to_pixels`, used by training and evaluation):
x/16 -> bilinear upscale to 32x32 (align_corners=False) -> repeat to 3 channels ->
normalise (x-0.5)/0.5. Training augmentation: random integer shifts of up to
{VIT_MAX_SHIFT} px in the 32x32 image (background filled). Label smoothing 0.1.

Shipped data (raw 8x8 uint8 `images` [N,8,8] + int64 `labels` [N]):
- `eval.safetensors`: the {m['heldout_size']} held-out images.
- `calib.safetensors`: {m['calib_size']} training images (seeded random subset) for calibration.

## Training
AdamW (lr {VIT_LR}, weight_decay {VIT_WD}), batch {VIT_BATCH}, {VIT_EPOCHS} epochs,
2-epoch linear warmup then cosine decay, grad-clip 1.0, seed {m['seed']},
`torch.use_deterministic_algorithms(True)`, `torch.set_num_threads({THREADS})`.

Command (from the repo root): `python scripts/train_reference.py --only vit`

Training time on the build machine: {m['train_seconds']:.0f} s wall
({m['train_steps']} steps, median {m['median_step_seconds']:.3f} s/step; {_machine()}).
Wall time grows a lot if other processes compete for the 2 cores; the weights do not change.

## Held-out metric
Top-1 accuracy on `eval.safetensors`: **{m['heldout_top1_accuracy'] * 100:.2f}%**
({m['heldout_correct']}/{m['heldout_size']}), measured on the shipped fp16 weights
loaded with `dtype=torch.float32`. Train accuracy: {m['train_top1_accuracy'] * 100:.2f}%.

```python
import torch
from transformers import AutoModelForImageClassification
from optcc.zoo.data import load_digits_split, zoo_dir
model = AutoModelForImageClassification.from_pretrained(zoo_dir() / "vit-digits", dtype=torch.float32).eval()
pixels, labels = load_digits_split("vit-digits", "eval")   # [N,3,32,32] f32, [N] i64
acc = (model(pixel_values=pixels).logits.argmax(-1) == labels).float().mean()
```
"""
    (out / "CARD.md").write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- byte LM


LM_SEED = 0
LM_SEQ = 256
LM_BATCH = 16
LM_STEPS = int(os.environ.get("OPTCC_LM_STEPS", "0")) or 560
LM_LR = 3e-3
LM_WD = 0.1
LM_HELDOUT_EVERY = 8        # every 8th sorted stdlib file is held out
LM_EVAL_BYTES = 48 * 1024
LM_CALIB_BYTES = 16 * 1024


def stdlib_files() -> list:
    """Sorted top-level stdlib *.py files (excluding the machine-specific _sysconfigdata*)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if not p.name.startswith("_sysconfigdata"))


def _read_text(paths) -> str:
    parts = []
    for p in paths:
        t = p.read_text(encoding="utf-8", errors="replace")
        parts.append(t if t.endswith("\n") else t + "\n")
    return "".join(parts)


def _cut_lines(text: str, max_bytes: int) -> str:
    """Longest prefix of whole lines whose UTF-8 encoding is <= max_bytes."""
    out, n = [], 0
    for line in text.splitlines(keepends=True):
        b = len(line.encode("utf-8"))
        if n + b > max_bytes:
            break
        out.append(line)
        n += b
    return "".join(out)


@torch.no_grad()
def eval_lm(model, ids: torch.Tensor, seq_len: int = LM_SEQ, batch: int = 16) -> float:
    """Mean next-byte cross-entropy (nats) over ``zdata.lm_windows(ids, seq_len)``."""
    model.eval()
    wins = zdata.lm_windows(ids, seq_len)
    full = [w for w in wins if len(w) == seq_len + 1]
    rest = [w for w in wins if len(w) != seq_len + 1]
    tot, cnt = 0.0, 0
    for i in range(0, len(full), batch):
        w = torch.stack(full[i:i + batch])
        logits = model(input_ids=w[:, :-1]).logits.float()
        tot += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                               reduction="sum").item()
        cnt += w[:, 1:].numel()
    for w in rest:
        if len(w) < 2:
            continue
        logits = model(input_ids=w[None, :-1]).logits.float()
        tot += F.cross_entropy(logits[0], w[1:], reduction="sum").item()
        cnt += len(w) - 1
    return tot / cnt


def train_lm(out_root: pathlib.Path) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    _setup(LM_SEED)
    out = out_root / "byte-llama"
    t0 = time.time()

    files = stdlib_files()
    held = [p for i, p in enumerate(files) if i % LM_HELDOUT_EVERY == 0]
    train = [p for i, p in enumerate(files) if i % LM_HELDOUT_EVERY != 0]
    train_text, held_text = _read_text(train), _read_text(held)
    train_ids, held_ids = zdata.byte_encode(train_text), zdata.byte_encode(held_text)
    eval_text = _cut_lines(held_text, LM_EVAL_BYTES)
    # calibration: whole lines from the middle of the training text
    mid = train_text[len(train_text) // 2:]
    mid = mid[mid.index("\n") + 1:]
    calib_text = _cut_lines(mid, LM_CALIB_BYTES)
    print(f"[lm] {len(train)} train files ({len(train_ids) / 1e6:.2f} MB), "
          f"{len(held)} held-out files ({len(held_ids) / 1e6:.2f} MB)", flush=True)

    config = LlamaConfig(
        vocab_size=256, hidden_size=192, intermediate_size=512,
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        hidden_act="silu", max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_theta=10000.0, attention_bias=False, mlp_bias=False,
        tie_word_embeddings=False, initializer_range=0.02,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
        use_cache=True,
    )
    model = LlamaForCausalLM(config)
    n_params = _param_count(model)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": LM_WD},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=LM_LR, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(LM_SEED + 1)
    n_tok = len(train_ids)
    model.train()
    run_loss = None
    step_times = []
    for step in range(LM_STEPS):
        ts = time.perf_counter()
        starts = torch.randint(0, n_tok - LM_SEQ - 1, (LM_BATCH,), generator=g)
        w = torch.stack([train_ids[s:s + LM_SEQ + 1] for s in starts.tolist()])
        for pg in opt.param_groups:
            pg["lr"] = _cosine_lr(step, LM_STEPS, warmup=20, peak=LM_LR, floor=0.05)
        logits = model(input_ids=w[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, 256), w[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step_times.append(time.perf_counter() - ts)
        run_loss = loss.item() if run_loss is None else 0.95 * run_loss + 0.05 * loss.item()
        if step % 25 == 0 or step == LM_STEPS - 1:
            print(f"[lm] step {step + 1}/{LM_STEPS} loss {run_loss:.4f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    train_s = time.time() - t0

    _save_fp16(model, out)
    (out / "eval.txt").write_text(eval_text, encoding="utf-8")
    (out / "calib.txt").write_text(calib_text, encoding="utf-8")

    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ce = eval_lm(reloaded, zdata.byte_encode(eval_text))
    ce_held = eval_lm(reloaded, held_ids[: 512 * 1024])
    ce_calib = eval_lm(reloaded, zdata.byte_encode(calib_text))
    print(f"[lm] eval.txt CE {ce:.4f} nats/byte, ppl/byte {math.exp(ce):.4f}; "
          f"held-out (first 512 KiB) ppl {math.exp(ce_held):.4f}; calib ppl {math.exp(ce_calib):.4f}; "
          f"{train_s:.0f}s", flush=True)

    metrics = {
        "model": "byte-llama",
        "task": "causal-lm (UTF-8 bytes)",
        "metric": "heldout_perplexity_per_byte",
        "heldout_perplexity_per_byte": round(math.exp(ce), 6),
        "heldout_ce_nats_per_byte": round(ce, 6),
        "heldout_bits_per_byte": round(ce / math.log(2), 6),
        "eval_txt_bytes": len(eval_text.encode("utf-8")),
        "heldout_full_first512KiB_perplexity_per_byte": round(math.exp(ce_held), 6),
        "calib_perplexity_per_byte": round(math.exp(ce_calib), 6),
        "calib_txt_bytes": len(calib_text.encode("utf-8")),
        "train_files": len(train),
        "heldout_files": len(held),
        "train_bytes": len(train_ids),
        "heldout_bytes": len(held_ids),
        "weights_dtype": "float16",
        "evaluated_as": "fp16 weights loaded with dtype=torch.float32",
        "parameters": n_params,
        "train_seconds": round(train_s, 1),
        "median_step_seconds": round(_median(step_times), 4),
        "train_steps": LM_STEPS,
        "batch_size": LM_BATCH,
        "train_tokens": LM_STEPS * LM_BATCH * LM_SEQ,
        "seed": LM_SEED,
        "protocol": f"ids = optcc.zoo.data.byte_encode(eval.txt); windows = "
                    f"optcc.zoo.data.lm_windows(ids, {LM_SEQ}); each window w: logits = "
                    f"model(w[:-1]), CE vs w[1:]; ppl = exp(sum CE / number of targets)",
        "stdlib": f"Python {platform.python_version()} {sysconfig.get_paths()['stdlib']}",
        "heldout_file_names": [p.name for p in held],
    }
    _write_json(out / "metrics.json", metrics)
    _write_lm_card(out, config, metrics)
    _chmod_files(out)
    return metrics


def _write_lm_card(out: pathlib.Path, config, m: dict) -> None:
    text = f"""# byte-llama

Reference byte-level causal language model shipped with optcc (generated by
`scripts/train_reference.py`).

## Architecture
`transformers.LlamaForCausalLM` (model_type `llama`), trained from scratch:
RoPE (theta {config.rope_parameters['rope_theta'] if getattr(config, 'rope_parameters', None) else 10000.0}),
grouped-query attention, RMSNorm, SwiGLU MLP, untied input/output embeddings.

| field | value |
|---|---|
| vocab_size | {config.vocab_size} (raw UTF-8 bytes, no special tokens; bos/eos/pad = None) |
| hidden_size | {config.hidden_size} |
| intermediate_size | {config.intermediate_size} |
| num_hidden_layers | {config.num_hidden_layers} |
| num_attention_heads / num_key_value_heads | {config.num_attention_heads} / {config.num_key_value_heads} (head_dim {config.hidden_size // config.num_attention_heads}) |
| max_position_embeddings | {config.max_position_embeddings} |
| tie_word_embeddings | {config.tie_word_embeddings} |
| parameters | {m['parameters']:,} |
| weights | `model.safetensors`, float16 |

Tokenisation: `optcc/zoo/data.py::byte_encode` (text -> UTF-8 bytes -> ids 0..255) and
`byte_decode` (errors='replace'). No tokenizer files are needed.

## Data and split
The Python standard library's own top-level `*.py` sources
({m['stdlib']}, found via `sysconfig.get_paths()["stdlib"]`, `_sysconfigdata*` excluded),
sorted by file name. Every {LM_HELDOUT_EVERY}th file (index % {LM_HELDOUT_EVERY} == 0) is held out:
{m['train_files']} training files ({m['train_bytes']:,} bytes), {m['heldout_files']} held-out files
({m['heldout_bytes']:,} bytes). Held-out files: {', '.join(m['heldout_file_names'])}.

Shipped text (so evaluation never depends on the local stdlib):
- `eval.txt`: first {m['eval_txt_bytes']:,} bytes (whole lines) of the concatenated held-out files.
- `calib.txt`: {m['calib_txt_bytes']:,} bytes (whole lines) from the middle of the training text.

## Training
AdamW (lr {LM_LR}, betas 0.9/0.95, weight_decay {LM_WD} on matrices), batch {LM_BATCH} x
seq len {LM_SEQ} random training windows, {m['train_steps']} steps ({m['train_tokens']:,} tokens),
20-step warmup then cosine decay, grad-clip 1.0, seed {m['seed']},
`torch.use_deterministic_algorithms(True)`, `torch.set_num_threads({THREADS})`.

Command (from the repo root): `python scripts/train_reference.py --only lm`

Training time on the build machine: {m['train_seconds']:.0f} s wall, including data loading
({m['train_steps']} steps, median {m['median_step_seconds']:.3f} s/step; {_machine()}).
Wall time grows a lot if other processes compete for the 2 cores; the weights do not change.

## Held-out metric
Perplexity per byte on `eval.txt`: **{m['heldout_perplexity_per_byte']:.4f}**
(cross-entropy {m['heldout_ce_nats_per_byte']:.4f} nats/byte = {m['heldout_bits_per_byte']:.4f} bits/byte),
measured on the shipped fp16 weights loaded with `dtype=torch.float32`.
Protocol: {m['protocol']}.
For reference: first 512 KiB of all held-out files {m['heldout_full_first512KiB_perplexity_per_byte']:.4f};
`calib.txt` (training text) {m['calib_perplexity_per_byte']:.4f}.

```python
import math, torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from optcc.zoo.data import byte_encode, lm_windows, load_text_split, zoo_dir
model = AutoModelForCausalLM.from_pretrained(zoo_dir() / "byte-llama", dtype=torch.float32).eval()
tot = n = 0
for w in lm_windows(byte_encode(load_text_split("byte-llama", "eval")), 256):
    logits = model(input_ids=w[None, :-1]).logits[0]
    tot += F.cross_entropy(logits, w[1:], reduction="sum").item(); n += len(w) - 1
print(math.exp(tot / n))
```
"""
    (out / "CARD.md").write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["vit", "lm"], default=None, help="train only one model")
    ap.add_argument("--out", default=str(REPO / "optcc" / "zoo"), help="output root (default optcc/zoo/)")
    args = ap.parse_args(argv)
    out_root = pathlib.Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.only in (None, "vit"):
        results["vit-digits"] = train_vit(out_root)
    if args.only in (None, "lm"):
        results["byte-llama"] = train_lm(out_root)
    for name, m in results.items():
        key = "heldout_top1_accuracy" if "heldout_top1_accuracy" in m else "heldout_perplexity_per_byte"
        print(f"{name}: {key}={m[key]} train_seconds={m['train_seconds']}")


if __name__ == "__main__":
    main()
