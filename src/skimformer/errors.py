"""The two kinds of failure the CLI distinguishes (DESIGN.md, exit codes), and how their
messages stay one line.

`UserError` is the user's to fix (bad file, bad pipeline, missing optional backend): exit 2 with
one line that says what was wrong and what to do. `VerificationError` means we produced something
that does not match its program: exit 1, because that is our bug, not the user's.
"""

# How library messages wrap their cause: torch's weights-only refusal opens with a tag and lines
# of advice (load the file unsafely), puts advice after the cause ("Please use ... to allowlist
# this global") and ends with a documentation link.
TAGS = ("Weights only load failed.", "WeightsUnpickler error:")
ADVICE_LINES = ("weights_only", "This file can still be loaded", "Check the documentation")
CAUSE_LIMIT = 120  # a cause quoted inside a refusal, which also says what to do in about 200 characters


class UserError(ValueError):
    """Bad input or a refused request; the message is one line that says what to do."""


class VerificationError(RuntimeError):
    """An engine or rewritten program does not match its reference within tolerance."""


def cause(error: BaseException, limit: int = CAUSE_LIMIT) -> str:
    """A library exception's text cut to its cause, to quote in a one-line message: its first line
    that is not advice, without tags or sentences of advice ("Please ..."), at most `limit`
    characters; the exception's type when no line is left."""
    lines = []
    for line in str(error).splitlines():
        for tag in TAGS:
            line = line.strip().removeprefix(tag)
        if line.strip() and not any(a in line for a in ADVICE_LINES):
            lines.append(line.strip().split(" Please ")[0])
    line = lines[0] if lines else type(error).__name__
    return line if len(line) <= limit else line[:limit - 3].rstrip() + "..."


def one_line(message: str) -> str:
    """A message on one line: a refusal that quotes another's text keeps no line breaks."""
    return " ".join(message.split())
