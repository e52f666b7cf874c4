"""The errors a user can cause, caught by the CLI and reported as one line with exit code 2."""

from __future__ import annotations


def _user_errors() -> tuple[type[BaseException], ...]:
    # ValueError covers the typed errors below (each subclasses it) and workload checks;
    # OSError covers unreadable or missing files.
    from planner.hardware import BadProfileError
    from planner.plan import BadPlanFileError, PlanMismatchError
    from runtime.backend import OutOfBudgetError

    return (BadProfileError, BadPlanFileError, PlanMismatchError, ValueError, OSError, OutOfBudgetError)


USER_ERRORS = _user_errors()
