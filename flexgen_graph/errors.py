"""The one base of every error a user can cause and fix.

The CLI reports a UserError (and an OSError: a file, folder or disk of the user's) as one line
with exit code 2; anything else is a bug in flexgen-graph and ends with its traceback, exit 1.
UserError subclasses ValueError so that callers catching bad values keep catching it.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input, a plan that does not match, an infeasible plan, a bad profile: what the user can fix."""


class DiskFullError(UserError):
    """A write found no space left: names the file and how many more bytes it needed."""

    def __init__(self, path, need_bytes: int, what: str = "") -> None:
        self.path, self.need_bytes = path, need_bytes
        super().__init__(f"no space left on the disk of {path}{f' ({what})' if what else ''}: it needs "
                         f"{need_bytes} more bytes ({need_bytes / 2**20:.1f} MiB); free space there")
