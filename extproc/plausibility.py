"""How many tokens a request could possibly have been billed: the bound on upstream usage.

An upstream's usage figures are input like any other. A negative, absurd or non-finite count
would otherwise become a negative cost that refills a budget, or a cost that drains it, so what
a response reports is clamped to what its request could have produced, and the record flagged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from extproc.usage import Usage

# Past any model's context window or output limit today, with room to spare.
MAX_INPUT_TOKENS = 10_000_000
# What a reservation assumes of a model whose context window the price table does not give.
DEFAULT_CONTEXT_WINDOW = 1_000_000
MAX_OUTPUT_TOKENS = 1_000_000
# Tokens a provider adds around the text it was sent: chat templates, tool-use system prompts
# (Anthropic's is several hundred tokens), image headers.
_TEMPLATE_ALLOWANCE = 8192
# Request fields that pull in input the body does not hold: stored conversations, cached
# contexts, server-run tools whose results are billed as input.
_STORED_CONTEXT = frozenset(
    {
        "previous_response_id",
        "conversation",
        "cachedContent",
        "cached_content",
        "mcp_servers",
        "container",
    }
)
_CLIENT_TOOL_TYPES = frozenset({"function", "custom"})
# Anthropic's client-run tools carry a dated type: the caller executes them and sends the
# results back in a later body, like any function.
_CLIENT_TOOL_PREFIXES = ("bash_", "text_editor_", "computer_", "memory_")
_GEMINI_FUNCTION_TOOL = frozenset({"functionDeclarations", "function_declarations"})


@dataclass(frozen=True)
class UsageBounds:
    """The most a request could be billed for, per token kind."""

    input_tokens: int
    output_tokens: int


def bounds_for(
    doc: Any, body_bytes: int, extra_input_tokens: int, multiplier: int, output_limit: int | None
) -> UsageBounds:
    """Bounds for a request: its own bytes (no tokenizer makes more tokens than bytes) plus what
    tiktoken could not see, unless it draws on context held upstream; each completion at most
    `output_limit`, the tighter of its max_tokens and the model's limit (all three providers
    count reasoning and thinking inside that ceiling)."""
    if draws_on_upstream_context(doc):
        input_bound = MAX_INPUT_TOKENS
    else:
        input_bound = min(MAX_INPUT_TOKENS, body_bytes + extra_input_tokens + _TEMPLATE_ALLOWANCE)
    per_completion = min(output_limit or MAX_OUTPUT_TOKENS, MAX_OUTPUT_TOKENS)
    return UsageBounds(input_bound, per_completion * max(multiplier, 1))


def within(usage: Usage, bounds: UsageBounds) -> tuple[Usage, bool]:
    """`usage` clamped to `bounds`, its parts kept consistent; True when anything was clamped."""
    inp = _clamp(usage.input_tokens, bounds.input_tokens)
    out = _clamp(usage.output_tokens, bounds.output_tokens)
    write = _clamp(usage.cache_write_tokens, inp)
    clamped = Usage(
        input_tokens=inp,
        cached_input_tokens=_clamp(usage.cached_input_tokens, inp - write),
        cache_write_tokens=write,
        cache_write_1h_tokens=_clamp(usage.cache_write_1h_tokens, write),
        output_tokens=out,
        reasoning_tokens=_clamp(usage.reasoning_tokens, out),
    )
    return clamped, clamped != usage


def _clamp(value: int, bound: int) -> int:
    return max(0, min(value, bound))


def draws_on_upstream_context(doc: Any) -> bool:
    """Whether a request's billed input may include context its body only names."""
    if not isinstance(doc, dict):
        return False
    # The Responses API's stored prompt is an object; completions' `prompt` is the text itself.
    if any(k in doc for k in _STORED_CONTEXT) or isinstance(doc.get("prompt"), dict):
        return True
    tools = doc.get("tools")
    return isinstance(tools, list) and not all(_runs_on_client(t) for t in tools)


def _runs_on_client(tool: Any) -> bool:
    """A function the caller runs, whose results come back in a later request's body; anything
    else (web search, file search, code execution, URL fetches) adds billed input upstream."""
    if not isinstance(tool, dict):
        return True
    kind = tool.get("type")
    if kind is not None:
        return kind in _CLIENT_TOOL_TYPES or (
            isinstance(kind, str) and kind.startswith(_CLIENT_TOOL_PREFIXES)
        )
    # OpenAI and Anthropic function tools without a type; Gemini's functionDeclarations.
    return {"name", "input_schema"} <= tool.keys() or tool.keys() <= _GEMINI_FUNCTION_TOOL
