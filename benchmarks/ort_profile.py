"""Where an ONNX model's time goes in onnxruntime: kernel time per op type.

    python benchmarks/ort_profile.py out/model.onnx [other.onnx ...] [--batch 8] [--seq 128] [--threads 2]

Feeds random token ids (and an all-ones attention mask, zero token types) of
batch x seq to each model's own inputs, so it fits BERT-family text encoders such as
MiniLM; runs 3 warm-up and 10 profiled calls with onnxruntime's profiler and prints the
op types by kernel time per call. Used to compare optcc's int8 artifact with
onnxruntime's quantize_dynamic (docs/benchmarks.md)."""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np


def profile(path: Path, batch: int, seq: int, threads: int, calls: int = 10) -> dict[str, float]:
    from optcc.export.emit import ort_session

    sess = ort_session(path, threads, enable_profiling=True,
                       profile_file_prefix=str(Path(tempfile.mkdtemp(prefix="ort-prof-")) / "p"))
    rng = np.random.default_rng(0)
    fill = {"input_ids": rng.integers(1000, 20000, (batch, seq)), "attention_mask": np.ones((batch, seq)),
            "token_type_ids": np.zeros((batch, seq))}
    feed = {i.name: fill[i.name].astype(np.int64) for i in sess.get_inputs()}
    for _ in range(3):
        sess.run(None, feed)
    for _ in range(calls):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    per_op: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / (calls + 3)
    return dict(per_op)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", type=Path, nargs="+")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=14)
    a = ap.parse_args()
    for path in a.models:
        per_op = profile(path, a.batch, a.seq, a.threads)
        print(f"\n{path}: {sum(per_op.values()):.1f} ms of kernel time per call")
        print("| op type | ms per call |\n|---|---|")
        for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[: a.top]:
            print(f"| {op} | {ms:.2f} |")


if __name__ == "__main__":
    main()
