"""Decoder deployment form: one graph with an explicit KV cache.

    inputs : input_ids [B, T], past_key_{i}, past_value_{i} [B, Hkv, P, D] per layer
    outputs: logits [B, T, V], present_key_{i}, present_value_{i} [B, Hkv, P+T, D]

P = 0 is prefill, T = 1 is a decode step: one graph serves both (batch, T and P
are dynamic), which keeps one artifact per format and lets every pass see the
cache. The layout follows Optimum/onnxruntime-genai decoder exports.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator

import torch

from optcc.compat import forward_with_inputs, no_guard_module, size_oblivious_shapes  # noqa: F401  (no_guard_module: re-exported)
from optcc.errors import IntakeError


@dataclass(frozen=True)
class CacheSpec:
    layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int | None
    byte_level: bool
    # The graph's cache tensors, in input (= output) order, when a pass changed them (kv_share
    # removes or merges slots): {"name", "heads", "dim", "dtype", "length"} each, where length
    # names the dynamic dim 2 ("past", or e.g. "retained" for a slot that grows differently).
    # Empty: one key and one value [B, kv_heads, P, head_dim] per layer.
    slots: tuple = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "slots", tuple(dict(s) for s in self.slots))  # decoder.json gives lists

    def slot_list(self) -> list[dict]:
        if self.slots:
            return [dict(s) for s in self.slots]
        return [{"name": f"{kind}_{i}", "heads": self.kv_heads, "dim": self.head_dim, "dtype": "float32", "length": "past"}
                for i in range(self.layers) for kind in ("key", "value")]

    def names(self) -> list[str]:
        return [f"past_{s['name']}" for s in self.slot_list()]

    def output_names(self) -> list[str]:
        return ["logits"] + [f"present_{s['name']}" for s in self.slot_list()]

    def empty(self, batch: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        out = {}
        for s in self.slot_list():
            dt = getattr(torch, s["dtype"])
            out[f"past_{s['name']}"] = torch.zeros(batch, s["heads"], 0, s["dim"], dtype=dtype if dt.is_floating_point else dt)
        return out

    def follow(self, gm: torch.nn.Module) -> "CacheSpec":
        """The spec of a decoder graph's actual cache: its past_* placeholders in order (a pass
        marks a slot whose dim 2 is not the past length with node.meta["cache_length"])."""
        slots = []
        for ph in gm.graph.nodes:
            if ph.op != "placeholder" or not ph.name.startswith("past_"):
                continue
            v = ph.meta.get("val")
            slots.append({"name": ph.name[len("past_"):], "heads": int(v.shape[1]), "dim": int(v.shape[3]),
                          "dtype": str(v.dtype).removeprefix("torch."), "length": ph.meta.get("cache_length", "past")})
        default = CacheSpec(self.layers, self.kv_heads, self.head_dim, self.vocab_size, self.max_positions, self.byte_level)
        return default if slots == default.slot_list() else replace(default, slots=tuple(slots))

    def fit(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A batch with an empty past (calibration, evaluation, prefill) in this spec's layout."""
        ids = batch["input_ids"]
        return {**{k: v for k, v in batch.items() if not k.startswith("past_")}, **self.empty(ids.shape[0])}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def read(cls, path) -> "CacheSpec":
        """The layout an output folder's decoder.json records (written by `optcc apply`)."""
        import json

        with open(path) as f:
            return cls(**json.load(f))


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
        out = self._lm(input_ids=input_ids, cache=cache, position_ids=position_ids,
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
    cls = type("KVModule", (KVWrapper,), {"forward": forward_with_inputs(["input_ids", *names], "self.run")})
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
    return [t[:, :, :0] for layer in out.cache.layers for t in (layer.keys, layer.values)]


def example_inputs(wrapper: KVWrapper, spec: CacheSpec, input_ids: torch.Tensor, past_len: int) -> dict[str, torch.Tensor]:
    """Decode-shaped example: the first `past_len` tokens become a real cache, the rest is the new input.
    A non-empty past (>= 2) lets export keep every dimension dynamic."""
    with torch.no_grad():
        out = wrapper.run(input_ids[:, :past_len], list(spec.empty(input_ids.shape[0]).values()))
    return {"input_ids": input_ids[:, past_len:], **dict(zip(spec.names(), out[1:]))}


def dynamic_shapes(spec: CacheSpec) -> dict:
    auto = torch.export.Dim.AUTO
    lengths = {s["length"] for s in spec.slot_list()}
    dims = {name: torch.export.Dim(name, min=0, max=1 << 20) for name in sorted(lengths)}
    return {"input_ids": {0: auto, 1: auto},
            **{f"past_{s['name']}": {0: auto, 2: dims[s["length"]]} for s in spec.slot_list()}}


def own_inputs(gm: torch.nn.Module, spec: CacheSpec, prefix: torch.Tensor, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Decode-shaped inputs for a graph whose cache layout a pass changed: the graph's own
    prefill of `prefix` [B, P] becomes the past (what deployment would hold), then `input_ids`."""
    with torch.no_grad():
        out = list(gm(**{"input_ids": prefix, **spec.empty(prefix.shape[0])}))
    if len(out) != 1 + len(spec.names()):
        raise ValueError(f"the graph has {len(spec.names())} cache inputs but returns {len(out) - 1} cache outputs")
    for name, t, s in zip(spec.names(), out[1:], spec.slot_list()):
        if (t.dim() != 4 or t.shape[1] != s["heads"] or t.shape[3] != s["dim"]
                or str(t.dtype).removeprefix("torch.") != s["dtype"]):
            raise ValueError(f"cache output for {name} is {t.dtype} {tuple(t.shape)}, its input is "
                             f"{s['dtype']} [B, {s['heads']}, P, {s['dim']}]")
    return {"input_ids": input_ids, **dict(zip(spec.names(), out[1:]))}


@contextlib.contextmanager
def export_mode(spec: CacheSpec) -> Iterator[None]:
    """Export settings for a decoder graph. A slot with its own length (kv_share merge keeps a
    few exact tokens) is often 0 or 1 long in the example inputs; size-oblivious shapes keep
    export from specialising that dimension to the example's value."""
    if all(s["length"] == "past" for s in spec.slot_list()):
        yield
        return
    with size_oblivious_shapes():
        yield


Step = Callable[[dict[str, torch.Tensor]], list[torch.Tensor]]


def generate(step: Step, spec: CacheSpec, prompt: torch.Tensor, new_tokens: int,
             clock: Callable[[], float] | None = None) -> tuple[torch.Tensor, dict]:
    """Greedy generation through any step function (eager, .pt2 or onnxruntime).

    prompt: [B, T] token ids → ([B, new_tokens] ids, timings in seconds: prefill, decode steps, and
    of each decode step the part spent in the graph: inside InferenceSession.run where the step
    counts it (emit.OrtRunner.graph_s), else the whole step call; the rest is this loop's own
    (feeds, the cache handed back, argmax)).
    """
    import time

    clock = clock or time.perf_counter
    batch = prompt.shape[0]
    t0 = clock()
    out = step({"input_ids": prompt, **spec.empty(batch)})
    token = out[0][:, -1].argmax(-1, keepdim=True)
    t1 = clock()
    tokens, steps, graph = [token], [], []
    present = out[1:]
    for _ in range(new_tokens - 1):
        s0, g0 = clock(), getattr(step, "graph_s", None)
        feed = {"input_ids": token, **dict(zip(spec.names(), present))}
        c0 = clock()
        out = step(feed)
        c1 = clock()
        token = out[0][:, -1].argmax(-1, keepdim=True)
        steps.append(clock() - s0)
        graph.append(step.graph_s - g0 if g0 is not None else c1 - c0)
        tokens.append(token)
        present = out[1:]
    kv_bytes = sum(t.numel() * t.element_size() for t in present)
    positions = prompt.shape[1] + new_tokens - 1  # what the cache holds; slots may differ in length (kv_share merge)
    return torch.cat(tokens, dim=1), {"prefill_s": t1 - t0, "decode_s": steps, "decode_graph_s": graph,
                                      "kv_bytes_per_token": kv_bytes / max(1, positions * batch)}
