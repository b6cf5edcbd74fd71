"""User-facing errors: one line naming the problem and the fix."""

from __future__ import annotations


class OrbitError(Exception):
    """An error caused by user input (a path, a recipe, a checkpoint).

    The CLI prints ``str(err)`` as one red line and exits with code 2; ``--debug`` shows the
    traceback. ``fix`` is appended as the remedy.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} -- {fix}" if fix else problem)


def require_path(path: str, what: str, *, is_dir: bool | None = None) -> str:
    """Return ``path`` if it exists (and is a dir/file as asked), else raise OrbitError."""
    import os

    if not os.path.exists(path):
        raise OrbitError(f"{what} not found: {path}", "check the path or the recipe field that sets it")
    if is_dir is True and not os.path.isdir(path):
        raise OrbitError(f"{what} is not a directory: {path}", "point it at the checkpoint directory")
    if is_dir is False and os.path.isdir(path):
        raise OrbitError(f"{what} is a directory, expected a file: {path}", "point it at the file")
    if not os.access(path, os.R_OK):
        raise OrbitError(f"{what} is not readable: {path}", "fix its permissions")
    return path
