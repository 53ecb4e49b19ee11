"""The two kinds of failure the CLI distinguishes (DESIGN.md, exit codes).

`UserError` is the user's to fix (bad file, bad pipeline, missing optional backend): exit 2 with
one line that says what was wrong and what to do. `VerificationError` means we produced something
that does not match its program: exit 1, because that is our bug, not the user's.
"""


class UserError(ValueError):
    """Bad input or a refused request; the message is one line that says what to do."""


class VerificationError(RuntimeError):
    """An engine or rewritten program does not match its reference within tolerance."""
