"""Stage 7, report: views of the report object (markdown.py, terminal.py), pass diffs (diff.py) and terminal progress (progress.py)."""
