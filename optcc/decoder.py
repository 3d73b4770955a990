"""Decoder deployment form: one graph with an explicit KV cache.

    inputs : input_ids [B, T], past_key_{i}, past_value_{i} [B, Hkv, P, D] per layer
    outputs: logits [B, T, V], present_key_{i}, present_value_{i} [B, Hkv, P+T, D]

P = 0 is prefill, T = 1 is a decode step: one graph serves both (batch, T and P
are dynamic), which keeps one artifact per format and lets every pass see the
cache. The layout follows Optimum/onnxruntime-genai decoder exports.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch

from optcc.errors import IntakeError


@dataclass(frozen=True)
class CacheSpec:
    layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int | None
    byte_level: bool

    def names(self) -> list[str]:
        return [f"past_{kind}_{i}" for i in range(self.layers) for kind in ("key", "value")]

    def output_names(self) -> list[str]:
        return ["logits"] + [n.replace("past_", "present_") for n in self.names()]

    def empty(self, batch: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return {n: torch.zeros(batch, self.kv_heads, 0, self.head_dim, dtype=dtype) for n in self.names()}

    def to_dict(self) -> dict:
        return asdict(self)


class KVWrapper(torch.nn.Module):
    """Wrap an HF causal LM (or a module with `forward_with_cache`) into the explicit-cache form."""

    def __init__(self, model: torch.nn.Module, layers: int) -> None:
        super().__init__()
        # Register the model's children directly (not the model itself) so module paths in
        # the captured graph are the model's own (model.layers.3..., not model.model.layers.3).
        object.__setattr__(self, "_lm", model)
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        self.layers = layers

    def run(self, input_ids: torch.Tensor, past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if hasattr(self._lm, "forward_with_cache"):
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.layers)]
            logits, present = self._lm.forward_with_cache(input_ids, pairs)
            return (logits, *[t for kv in present for t in kv])
        from transformers import DynamicCache

        cache = DynamicCache(config=self._lm.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        p, t = past[0].shape[2], input_ids.shape[1]
        cache_position = torch.arange(p, p + t, device=input_ids.device)
        position_ids = cache_position.unsqueeze(0).expand(input_ids.shape[0], -1)
        out = self._lm(input_ids=input_ids, past_key_values=cache, position_ids=position_ids,
                         cache_position=cache_position, use_cache=True)
        return (out.logits, *[t for layer in cache.layers for t in (layer.keys, layer.values)])


def wrap(model: torch.nn.Module, source: str) -> tuple[KVWrapper, CacheSpec]:
    """The explicit-cache module for a causal LM, with a forward whose parameters are the
    named cache tensors (so artifacts get readable input names)."""
    cfg = getattr(model, "config", None)
    if hasattr(model, "forward_with_cache"):
        layers = int(getattr(model, "num_layers"))
    elif cfg is not None and getattr(cfg, "num_hidden_layers", None):
        layers = int(cfg.num_hidden_layers)
    else:
        raise IntakeError(f"{source}: text-generation needs a model with a KV cache",
                          "use a Hugging Face causal LM, or give the module forward_with_cache(input_ids, past) "
                          "and num_layers (see docs/generation.md)")
    names = [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    # forward(self, input_ids, past_key_0, past_value_0, ...): one named input per cache tensor.
    ns: dict = {}
    exec(f"def forward(self, input_ids, {', '.join(names)}):\n    return self.run(input_ids, [{', '.join(names)}])\n", ns)
    cls = type("KVModule", (KVWrapper,), {"forward": ns["forward"]})
    wrapper = cls(model, layers).eval()
    with torch.no_grad():
        probe = wrapper.run(torch.zeros(1, 2, dtype=torch.long), _probe_past(model, layers))
    k = probe[1]
    vocab = int(probe[0].shape[-1])
    max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) if cfg is not None else None
    spec = CacheSpec(layers, int(k.shape[1]), int(k.shape[3]), vocab, max_pos, vocab == 256)
    return wrapper, spec


def _probe_past(model: torch.nn.Module, layers: int) -> list[torch.Tensor]:
    """Empty past tensors of the right head count/size, found by one tiny prefill."""
    if hasattr(model, "forward_with_cache"):
        _, present = model.forward_with_cache(torch.zeros(1, 1, dtype=torch.long), None)
        return [t[:, :, :0] for kv in present for t in kv]
    out = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True)
    return [t[:, :, :0] for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]


def example_inputs(wrapper: KVWrapper, spec: CacheSpec, input_ids: torch.Tensor, past_len: int) -> dict[str, torch.Tensor]:
    """Decode-shaped example: the first `past_len` tokens become a real cache, the rest is the new input.
    A non-empty past (>= 2) lets export keep every dimension dynamic."""
    with torch.no_grad():
        out = wrapper.run(input_ids[:, :past_len], list(spec.empty(input_ids.shape[0]).values()))
    return {"input_ids": input_ids[:, past_len:], **dict(zip(spec.names(), out[1:]))}


def dynamic_shapes(spec: CacheSpec) -> dict:
    auto = torch.export.Dim.AUTO
    past = torch.export.Dim("past", min=0, max=1 << 20)
    return {"input_ids": {0: auto, 1: auto}, **{n: {0: auto, 2: past} for n in spec.names()}}


@contextlib.contextmanager
def no_guard_module() -> Iterator[None]:
    """torch 2.13's generated input-guard module fails on graphs with a KV cache (it
    raises on valid inputs, e.g. a zero-length past); ONNX export builds that module
    internally. Skip generating it while exporting or loading a decoder; shapes are
    still checked by our own verification of every artifact."""
    from torch.export import _unlift

    original = _unlift._ok_to_generate_guards_fn
    _unlift._ok_to_generate_guards_fn = lambda: False
    try:
        yield
    finally:
        _unlift._ok_to_generate_guards_fn = original


Step = Callable[[dict[str, torch.Tensor]], list[torch.Tensor]]


def generate(step: Step, spec: CacheSpec, prompt: torch.Tensor, new_tokens: int,
             clock: Callable[[], float] | None = None) -> tuple[torch.Tensor, dict]:
    """Greedy generation through any step function (eager, .pt2 or onnxruntime).

    prompt: [B, T] token ids → ([B, new_tokens] ids, timings in seconds: prefill, decode steps).
    """
    import time

    clock = clock or time.perf_counter
    batch = prompt.shape[0]
    t0 = clock()
    out = step({"input_ids": prompt, **spec.empty(batch)})
    token = out[0][:, -1].argmax(-1, keepdim=True)
    t1 = clock()
    tokens, steps = [token], []
    present = out[1:]
    for _ in range(new_tokens - 1):
        s0 = clock()
        out = step({"input_ids": token, **dict(zip(spec.names(), present))})
        token = out[0][:, -1].argmax(-1, keepdim=True)
        steps.append(clock() - s0)
        tokens.append(token)
        present = out[1:]
    kv_bytes = sum(t.numel() * t.element_size() for t in present)
    positions = present[0].shape[2] if present else 0
    return torch.cat(tokens, dim=1), {"prefill_s": t1 - t0, "decode_s": steps,
                                      "kv_bytes_per_token": kv_bytes / max(1, positions * batch)}
