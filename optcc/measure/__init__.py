"""Stage 6, measurement: latency (latency.py), generation speed (generation.py), task metrics (task.py), fidelity math (metrics.py) and machine facts (environment.py)."""
