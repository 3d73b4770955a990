"""One error hierarchy. The CLI maps each class to a one-line message, the next
step and a distinct exit code; `--debug` shows the traceback."""
from __future__ import annotations


class OptccError(Exception):
    """Base class. `hint` is the next step a user can take."""

    exit_code = 1
    kind = "error"

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class RecipeError(OptccError):
    """The recipe or the command line is wrong: nothing was run."""

    exit_code = 2
    kind = "recipe error"


class IntakeError(OptccError):
    """The model could not be loaded, or its inputs could not be built."""

    exit_code = 3
    kind = "model error"


class PassError(OptccError):
    """A pass refused the model or broke the graph."""

    exit_code = 4
    kind = "pass error"


class ExportError(OptccError):
    """Capture or emission of an artifact failed, or it did not match the reference."""

    exit_code = 5
    kind = "export error"


class BenchError(OptccError):
    """Benchmarking or evaluation failed."""

    exit_code = 6
    kind = "bench error"


class RequirementError(OptccError):
    """The run finished and wrote its report, but a `require:` gate was not met."""

    exit_code = 7
    kind = "requirement not met"


EXIT_CODES = {
    cls.__name__: cls.exit_code
    for cls in (OptccError, RecipeError, IntakeError, PassError, ExportError, BenchError, RequirementError)
}
