"""Pure tensor math, no graph code: ToMe merging (tome.py), KV merging (kvmath.py), quantizers
(quantizers.py), layer influence (influence.py), fidelity and task metrics (metrics.py)."""
