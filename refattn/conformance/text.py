"""Text from a suite or an implementation, made safe to print.

A manifest is data anyone may have written; so are the messages of an
implementation's exceptions. Printed raw, a control character (an ANSI
escape, a carriage return, a bidirectional override) can rewrite what a
terminal or a CI log shows, e.g. turn "FAILED" into "OK". :func:`printable`
replaces every such character by its escape, visibly.
"""

from __future__ import annotations

import unicodedata

#: Unicode categories never printed as they are: controls, format characters
#: (bidirectional overrides, zero-width joiners), surrogates, private use, line
#: and paragraph separators.
UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def printable(text: str, limit: int | None = None) -> str:
    """``text`` with each unprintable character written as ``\\xNN`` / ``\\uNNNN``, cut to ``limit`` characters."""
    cleaned = "".join(_escape(c) if unicodedata.category(c) in UNPRINTABLE_CATEGORIES else c for c in str(text))
    if limit is not None and len(cleaned) > limit:
        return cleaned[: limit - 3] + "..."
    return cleaned


def _escape(character: str) -> str:
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
