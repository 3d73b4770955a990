"""Stage 5, export: the optimized graph → model.pt2 / model.onnx, each re-loaded and verified (emit.py)."""
