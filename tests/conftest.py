import os
import sys
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
emit: {formats: [onnx, torch]}
bench: {warmup: 1, iters: 2, min_seconds: 0.0}
"""


@pytest.fixture
def fast_recipe(tmp_path):
    return write_recipe(tmp_path, FAST_RECIPE)
