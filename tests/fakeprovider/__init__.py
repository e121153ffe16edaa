"""Fake OpenAI / Anthropic / Gemini provider for Spendgate's tests and benchmarks."""

from tests.fakeprovider import server as _server
from tests.fakeprovider.server import *  # noqa: F403 - the package's API is the server module's

__all__ = _server.__all__
