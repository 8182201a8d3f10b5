"""Credentials out of text that is shown or logged.

A URL may carry user info (``https://user:secret@host/hook``): the webhook URL is configured
that way at some sites. Anything that displays a destination, an error message or a log line
passes it through :func:`strip_userinfo`, which drops the ``user:secret@`` part of every URL
in the text and leaves the rest as it was.
"""

from __future__ import annotations

import re
from typing import Any

# scheme://userinfo@ -- userinfo is anything up to the first "@" that has no "/", "?", "#" or space
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/?#@\s]*@")


def strip_userinfo(text: str) -> str:
    """``text`` with the user info of every URL in it removed."""
    if "@" not in text or "://" not in text:
        return text
    return _USERINFO.sub(r"\1", text)


def strip_userinfo_deep(value: Any) -> Any:
    """:func:`strip_userinfo` on every string inside dicts, lists and tuples (other values kept)."""
    if isinstance(value, str):
        return strip_userinfo(value)
    if isinstance(value, dict):
        return {k: strip_userinfo_deep(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(strip_userinfo_deep(v) for v in value)
    return value
