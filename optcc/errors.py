"""One error hierarchy. The CLI maps each class to a one-line message, the next
step and a distinct exit code; `--debug` shows the traceback."""
from __future__ import annotations


class OptccError(Exception):
    """Base class. `hint` is the next step a user can take. Each subclass names its `kind`
    (the CLI's prefix) and its distinct `exit_code` in the class statement."""

    exit_code = 1
    kind = "error"

    def __init_subclass__(cls, exit_code: int = 1, kind: str = "error", **kw) -> None:
        super().__init_subclass__(**kw)
        cls.exit_code, cls.kind = exit_code, kind

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class RecipeError(OptccError, exit_code=2, kind="recipe error"):
    """The recipe or the command line is wrong: nothing was run."""


class IntakeError(OptccError, exit_code=3, kind="model error"):
    """The model could not be loaded, or its inputs could not be built."""


class PassError(OptccError, exit_code=4, kind="pass error"):
    """A pass refused the model or broke the graph."""


class ExportError(OptccError, exit_code=5, kind="export error"):
    """Capture or emission of an artifact failed, or it did not match the reference."""


class BenchError(OptccError, exit_code=6, kind="bench error"):
    """Benchmarking or evaluation failed."""


class RequirementError(OptccError, exit_code=7, kind="requirement not met"):
    """The run finished and wrote its report, but a `require:` gate was not met."""
