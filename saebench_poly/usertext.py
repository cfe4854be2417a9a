"""Text that users write (entry and spec names, paths, messages quoting them), on its way in and on its way out.

In: an entry name (`check_entry_name`) is ASCII letters, digits and ``. _ - : / + = @ ,`` with inner spaces, at most
200 characters, starting with a letter or digit (`NAME_CHARACTERS` says so in words). That covers every name
saebench-poly derives (``neurons:blocks.0.mlp.hook_post``, ``gemma-scope/layer_5/width_16k``) and keeps out what
a terminal or a Markdown table would interpret: control characters (ESC, OSC, BEL, newline), ``|``, ``[`` and
``]`` (rich markup), backticks.

Out: what reaches a terminal goes through `printable` (control and other non-printing characters become visible
escapes such as ``\\x1b``) and is printed with rich markup off; what goes into a Markdown report goes through
`markdown_text` or `markdown_code`. JSON needs nothing: `json.dumps` escapes control characters.
"""

from __future__ import annotations

import re

from saebench_poly.errors import UserError

NAME_PATTERN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._:/+=@,\- ]{0,198}[A-Za-z0-9._:/+=@,\-])?")
NAME_CHARACTERS = "ASCII letters, digits and . _ - : / + = @ , (spaces inside), at most 200, starting with a letter or digit"
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~])")


def is_valid_name(name: str) -> bool:
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


def check_entry_name(name: str, origin: str) -> str:
    """``name`` when it is a valid entry name, else a `UserError` that says where it came from (``origin``)."""
    if not is_valid_name(name):
        raise UserError(f"entry name {printable(repr(name))} (from {printable(origin)}) may use only {NAME_CHARACTERS}: "
                        "give the entry another name in the spec (entries = [{uri = \"...\", name = \"...\"}])")
    return name


def printable(text: object) -> str:
    """``text`` with every character that a terminal would not print as itself (ESC, BEL, newline, other
    control and format characters) written as its Python escape, so that nothing in it acts on the terminal."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def markdown_text(text: object) -> str:
    """``text`` for a Markdown paragraph or table cell: printable, with Markdown's special characters (``|``
    included) backslash-escaped, so it renders as itself and cannot end a table cell."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", printable(text))


def markdown_code(text: object) -> str:
    """``text`` as Markdown inline code (outside tables): printable, fenced by more backticks than it contains."""
    body = printable(text)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", body)), default=0) + 1)
    return f"{fence} {body} {fence}" if body.startswith("`") or body.endswith("`") else f"{fence}{body}{fence}"
