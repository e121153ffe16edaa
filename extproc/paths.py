"""The one path a request is accounted on, checked by policy on, and forwarded with.

Envoy normalises paths too (normalize_path, merge_slashes, escaped slashes refused), but a filter
that trusts its front door is one config change away from a bypass: `/v1/chat/completions/`,
`//v1/chat/completions` or `models/flash/../pro:generateContent` must never be accounted as one
thing and served as another. So the filter derives the canonical form itself, refuses what has
no unambiguous one, and forwards exactly the path it accounted.
"""

from __future__ import annotations

import re

# RFC 3986 unreserved characters: decoding them changes nothing a server can tell apart.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
# Anything that could make a path mean something other than its text; most paths have none of
# it and are already canonical, which keeps the common case to one scan.
_IRREGULAR = re.compile(r"[%\\;#\x00-\x20\x7f]|//|/\.|/$")
_REFUSED_CHARS = re.compile(r"[\\;#\x00-\x20\x7f]")
MAX_PATH_BYTES = 4096


class UnsafePath(ValueError):
    """A path with no single meaning: upstreams could read it differently from the proxy."""


def _decode_unreserved(match: re.Match[str]) -> str:
    byte = int(match.group(1), 16)
    if byte in _UNRESERVED:
        return chr(byte)
    # An escaped slash, colon, semicolon, percent sign or control byte could be decoded by the
    # upstream after the proxy matched the raw text: refuse rather than guess.
    raise UnsafePath(f"the path contains an escaped '%{match.group(1).upper()}'")


def canonical_path(path: str) -> str:
    """The normalised form of a request path (without its query string).

    Unreserved escapes are decoded, repeated slashes merged, `.` and `..` segments resolved and
    a trailing slash dropped. Escapes of anything else, backslashes, `;` parameters, control
    characters and malformed escapes raise UnsafePath.
    """
    if len(path) > MAX_PATH_BYTES:
        raise UnsafePath(f"the path is longer than {MAX_PATH_BYTES} bytes")
    if not path.startswith("/"):
        raise UnsafePath("the path must start with '/'")
    if _IRREGULAR.search(path) is None:
        return path
    if _REFUSED_CHARS.search(path):
        raise UnsafePath("the path contains a backslash, ';', '#', a space or a control character")
    decoded = _ESCAPE.sub(_decode_unreserved, path)
    if "%" in decoded:
        raise UnsafePath("the path contains a malformed percent escape")
    segments: list[str] = []
    for seg in decoded.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if not segments:
                raise UnsafePath("the path climbs above its root")
            segments.pop()
            continue
        segments.append(seg)
    return "/" + "/".join(segments)
