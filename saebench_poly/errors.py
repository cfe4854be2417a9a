"""The one exception type for user mistakes.

A `UserError` is reported by the CLI as a single line (what is wrong and what to do) with a non-zero exit and no
traceback. Anything else that escapes is a bug in saebench_poly and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input (a path, a spec, a checkpoint, a name): one line, no traceback."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty). A first line that
    only announces what follows (``Error(s) in loading state_dict for StandardSAE:``) gets the next line too,
    which says what is wrong (``size mismatch for W_enc: ...``)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or [type(err).__name__]
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
