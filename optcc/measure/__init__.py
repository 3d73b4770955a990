"""Stage 6, measurement: latency (latency.py), generation speed (generation.py), task metrics on
evaluation data (task.py) and machine facts (environment.py)."""
