"""Provider wire protocols, one module each, and how a request finds its provider."""

from __future__ import annotations

from extproc.providers.anthropic import Anthropic
from extproc.providers.base import Provider
from extproc.providers.gemini import Gemini
from extproc.providers.openai import OpenAI

PROVIDERS: dict[str, Provider] = {p.name: p for p in (OpenAI(), Anthropic(), Gemini())}


def guess_from_request(path: str, header_names: set[str]) -> Provider:
    """The provider whose error format suits a request we reject before knowing its key."""
    if path.startswith(("/v1beta/", "/v1alpha/")) or "x-goog-api-key" in header_names:
        return PROVIDERS["gemini"]
    if path.startswith("/v1/messages") or "anthropic-version" in header_names or "x-api-key" in header_names:
        return PROVIDERS["anthropic"]
    return PROVIDERS["openai"]
