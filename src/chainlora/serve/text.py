"""Text that enters the server is valid Unicode, or the request is a 400 naming where it is not.

JSON can carry lone UTF-16 surrogates as `\\udXXX` escapes, and Python's parser hands them on as
`str`, as it does surrogates encoded in the raw bytes (it decodes with `surrogatepass`); the
first thing that encodes such a string (the tokenizer, an error message that quotes it) fails,
which was a 500 with a traceback per request. Other bytes that are not UTF-8 (an overlong form,
a code point past U+10FFFF) never get this far: the parser refuses them. So a parsed body is
checked once, before anything reads it: every string and every key.
"""

from __future__ import annotations

import re
from typing import Any

from chainlora.serve.errors import ApiError

# a surrogate's escape, or its UTF-8 bytes, in the raw body: only then can a parsed string hold one
ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
SURROGATE = re.compile("[\ud800-\udfff]")  # left in a parsed string only when unpaired


def invalid_field(data: Any) -> str | None:
    """The dotted path (`messages.0.content`) of a string with a lone surrogate, the object's
    path for such a key ("body" at the top), or None."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if SURROGATE.search(item):
                return path or "body"
        elif isinstance(item, dict):
            for key, value in item.items():
                if SURROGATE.search(key):
                    return path or "body"
                stack.append((value, f"{path}.{key}" if path else key))
        elif isinstance(item, list):
            stack.extend((value, f"{path}.{i}" if path else str(i)) for i, value in enumerate(item))
    return None


def check_unicode(raw: bytes, data: Any) -> None:
    """A 400 naming the first field found that is not valid Unicode (see the module docstring)."""
    if not ESCAPE.search(raw):
        return
    field = invalid_field(data)
    if field is not None:
        field = field[:200]
        raise ApiError(400, f"{field}: not valid Unicode (a lone UTF-16 surrogate escape; send UTF-8 text, or "
                            "surrogates only in pairs)", param=field, code="invalid_unicode")
