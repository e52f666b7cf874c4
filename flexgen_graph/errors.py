"""The one base of every error a user can cause and fix.

The CLI reports a UserError (and an OSError: a file, folder or disk of the user's) as one line
with exit code 2; anything else is a bug in flexgen-graph and ends with its traceback, exit 1.
UserError subclasses ValueError so that callers catching bad values keep catching it.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input, a plan that does not match, an infeasible plan, a bad profile: what the user can fix."""
