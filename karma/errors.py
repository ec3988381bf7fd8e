"""The one exception type users see: a single line naming file, field, value and expectation."""

from __future__ import annotations

from typing import Any


class KarmaError(Exception):
    """Bad input or params. ``str(err)`` is one line; the CLI prints it and exits non-zero."""

    def __init__(
        self,
        message: str,
        *,
        file: object | None = None,
        field: str | None = None,
        value: Any = None,
        expected: str | None = None,
    ) -> None:
        parts = []
        if file is not None:
            parts.append(str(file))
        if field is not None:
            parts.append(f"field {field!r}")
        head = ": ".join(parts)
        text = f"{head}: {message}" if head else message
        if value is not None:
            text += f" (got {value!r}"
            text += f"; expected {expected})" if expected else ")"
        elif expected:
            text += f" (expected {expected})"
        super().__init__(" ".join(text.split()))
