"""The one exception type the CLI turns into a one-line message and an exit code."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a message naming the file/option and the fix, and an exit code."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class LayoutError(UserError):
    """A parallel layout that cannot run; `problems` holds one line per broken rule."""

    def __init__(self, recipe_name: str, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid layout for recipe '{recipe_name}':\n{lines}", exit_code=2)
