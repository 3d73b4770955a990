"""optcc's benchmark suite: `python -m benchmarks [--quick] [--only W1,W2,W3]`.
See docs/benchmarks.md. Per-pass scripts (benchmarks/<pass>.py) hold pass-specific sweeps."""
