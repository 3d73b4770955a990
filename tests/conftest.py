import os
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))

HANDWRITTEN = str(ROOT / "tests" / "models" / "handwritten.py")


def write_recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


FAST_RECIPE = """
version: 1
model: {inputs: {batch: 2, seq_len: 16}}
passes:
  - cleanup: {}
emit: {formats: [onnx, exported]}
bench: {warmup: 1, iters: 2, min_seconds: 0.0}
"""


@pytest.fixture
def fast_recipe(tmp_path):
    return write_recipe(tmp_path, FAST_RECIPE)


@lru_cache(maxsize=None)
def captured_decoder(source: str, task=None):
    """(prep, graph) of a decoder captured with its explicit KV cache, as `optcc apply` does
    (batch 2, seq_len 12); cached per model: callers deep-copy the graph before editing it."""
    from optcc.api import prepare
    from optcc.graph.capture import capture
    from optcc.intake.decoder import dynamic_shapes, no_guard_module
    from optcc.config.recipe import parse_recipe

    prep = prepare(source, task, None, parse_recipe("version: 1\nmodel: {inputs: {batch: 2, seq_len: 12}}\n"))
    with no_guard_module():
        gm = capture(prep.lm.module, prep.inputs, True, dynamic_shapes(prep.cache)).module()
    return prep, gm


def pass_context(prep):
    """The PassContext `optcc apply` builds for a prepared model."""
    from optcc.pipeline.context import PassContext

    return PassContext(prep.lm.task, prep.inputs, prep.reference, prep.primary, prep.causal, cache=prep.cache, prefix=prep.prefix)
