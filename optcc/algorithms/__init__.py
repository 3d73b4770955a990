"""Pure tensor math behind the passes, no graph code: ToMe merging (tome.py), KV merging (kvmath.py), quantizers (quantizers.py), layer influence (influence.py)."""
