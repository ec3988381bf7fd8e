"""The one exception type users see: a single line naming file, field, value and expectation."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

#: The most digits of an integer in a JSON or YAML input (Python refuses over 4300 anyway).
MAX_INT_DIGITS = 40


class KarmaError(Exception):
    """Bad input or params. ``str(err)`` is one line; the CLI prints it and exits non-zero.

    >>> str(KarmaError("out of range", file="params.yaml", field="select.ratio", value=0,
    ...                expected="0 < ratio <= 1"))
    "params.yaml: field 'select.ratio': out of range (got 0; expected 0 < ratio <= 1)"
    """

    def __init__(
        self,
        message: str,
        *,
        file: object | None = None,
        field: str | None = None,
        value: Any = None,
        expected: str | None = None,
    ) -> None:
        self.parts = (message, file, field, value, expected)
        parts = []
        if file is not None:
            parts.append(str(file))
        if field is not None:
            parts.append(f"field {field!r}")
        head = ": ".join(parts)
        text = f"{head}: {message}" if head else message
        if value is not None:
            shown = shorten(value, 120)
            text += f" (got {shown}"
            text += f"; expected {expected})" if expected else ")"
        elif expected:
            text += f" (expected {expected})"
        super().__init__(" ".join(text.split()))

    def sourced(self, file: object, field: str | None) -> KarmaError:
        """The same error, naming where its params key came from (a flag or the params file)."""
        message, _, _, value, expected = self.parts
        return KarmaError(message, file=file, field=field, value=value, expected=expected)


def did_you_mean(name: object, known: Iterable[str], *, prefix: str = "") -> str:
    """``"; did you mean 'x'?"`` for the closest known names, or ``""``.

    >>> did_you_mean("raito", ["ratio", "beta"])
    "; did you mean 'ratio'?"
    """
    close = difflib.get_close_matches(str(name), list(known), n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(prefix + c) for c in close)}?" if close else ""


def shorten(value: object, width: int = 60) -> str:
    """``repr`` of a value, cut to ``width`` characters before anything large is built."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring = r.maxother = r.maxlong = width
    r.maxlevel, r.maxdict, r.maxlist = 2, 4, 4
    text = r.repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
