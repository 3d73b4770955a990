"""Terminal progress for `optcc apply`, on stderr; silent when stderr is not a TTY."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress as RichProgress, SpinnerColumn, TextColumn, TimeElapsedColumn


class Progress:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal
        self._p = RichProgress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                               console=console, transient=True, disable=not self.live)
        self._stage = None
        self._bars: dict[str, Any] = {}

    def __enter__(self) -> "Progress":
        self._p.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._p.__exit__(*exc)

    def event(self, kind: str, **d: Any) -> None:
        if kind == "stage":
            if self._stage is not None:
                self._p.update(self._stage, completed=1, total=1)
            self._stage = self._p.add_task(d["name"], total=None)
        elif kind == "pass":
            self._p.update(self._stage, description=f"pass {d['i']}/{d['n']}: {d['name']}")
        elif kind == "progress_start":
            self._bars[d["desc"]] = self._p.add_task(d["desc"], total=d["total"])
        elif kind == "progress":
            self._p.advance(self._bars[d["desc"]], d.get("advance", 1))
