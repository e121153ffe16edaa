"""OpenAI's wire protocol: chat completions, completions, responses and embeddings."""

from __future__ import annotations

import functools
import json
from typing import Any

from extproc.providers.base import (
    FREE_METHODS,
    UPSTREAM_CONTEXT_TOKENS,
    BadRequest,
    Change,
    JSONRejected,
    ParsedRequest,
    Reported,
    SSEAccountant,
    StreamAccountant,
    UsageReader,
    capped,
    clamp,
    collect_text,
    count_field,
    json_text,
    last_usage,
    load_json_object,
    load_response_json,
    optional_object,
    optional_str,
    stream_flag,
    visible_text,
    walk_dicts,
)
from extproc.usage import Usage

CHAT = "chat.completions"
COMPLETIONS = "completions"
RESPONSES = "responses"
EMBEDDINGS = "embeddings"

_APIS = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": COMPLETIONS,
    "/v1/responses": RESPONSES,
    "/v1/embeddings": EMBEDDINGS,
}
_DELTA_KEYS = frozenset({"content", "text", "arguments", "delta", "refusal"})
_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_denied", "model_not_allowed"),
    404: ("invalid_request_error", "not_found"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_exceeded", "rate_limit_exceeded"),
}
# Output ceilings, any of which a client may send: chat takes max_completion_tokens (max_tokens
# is its deprecated alias), completions max_tokens, responses max_output_tokens. All count
# reasoning tokens. When several are present the largest is reserved.
_CEILINGS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
# Documented ranges of the completion multipliers (API reference: chat `n` and completions `n`
# up to 128, completions `best_of` up to 20).
MAX_N = 128
MAX_BEST_OF = 20

# -- input tiktoken cannot read: worst cases per part ------------------------------------------
# Images (image_url in chat, input_image in responses) are reserved at high detail whatever the
# request says ("auto" may choose high). Tile models (GPT-4o, o1, o3): fit in 2048x2048, short
# side down to 768 px, 170 tokens per 512 px tile plus 85 — at most 2x4 tiles, 1,445 tokens.
# Patch models (GPT-4.1 mini/nano, o4-mini, ...): at most 1,536 patches of 32 px times a
# per-model factor of up to 2.46 (GPT-4.1 nano), 3,779 tokens. 6,000 covers both with room for
# factors not yet published. Source: OpenAI's images-and-vision guide, "Calculating costs".
IMAGE_TOKENS = 6_000
# GPT-4o mini bills an image as 2,833 tokens plus 5,667 per tile (same guide): 8 tiles, 48,169.
IMAGE_TOKENS_4O_MINI = 48_169
# Audio input (input_audio) is billed at about 10 tokens a second (one per 100 ms: $0.06 a
# minute at $100 per million audio tokens). The most compressed format accepted, mp3 at
# 8 kbit/s, carries a second in ~1,336 base64 characters; one token per 16 characters leaves
# an 8x margin. Audio sent by reference (an earlier answer's `audio.id`) has no size to go by:
# reserved as 30 minutes.
AUDIO_B64_CHARS_PER_TOKEN = 16
AUDIO_REFERENCE_TOKENS = 18_000
# Files (file in chat, input_file in responses): a PDF reaches the model as each page's text
# plus an image of the page, at most 100 pages per request (OpenAI's file inputs guide). Each
# page is reserved as the image bound plus 3,000 tokens of text (a dense page runs 1,500-3,000).
# The page limit is per request, so this is reserved once however many files there are.
PDF_PAGES_PER_REQUEST = 100
PDF_TEXT_TOKENS_PER_PAGE = 3_000
# The Responses API ends a stream with one event repeating the whole response, usage last: a
# 128k-token answer of escaped non-ASCII text passes the 1 MiB other streams' events are held to.
RESPONSE_EVENT_BYTES = 8 << 20
# Tools that run on the client: their results come back in a later request's body.
_CLIENT_TOOLS = frozenset({"function", "custom"})


class OpenAI:
    """OpenAI and every OpenAI-compatible upstream (Azure OpenAI, vLLM, ...)."""

    name = "openai"

    def api_for(self, method: str, path: str) -> str | None:
        """See Provider.api_for."""
        return _APIS.get(path) if method == "POST" else None

    def is_free(self, method: str, path: str) -> bool:
        """See Provider.is_free. Moderation is free of charge."""
        return method in FREE_METHODS or path == "/v1/moderations"

    def auth_headers(self, secret: str) -> list[tuple[str, str]]:
        """See Provider.auth_headers."""
        return [("authorization", "Bearer " + secret)]

    def parse_request(self, api: str, path: str, body: bytes) -> ParsedRequest:
        """See Provider.parse_request."""
        doc = load_json_object(body)
        model = optional_str(doc, "model")
        if not model:
            raise BadRequest("you must provide a model parameter")
        stream = stream_flag(doc)
        ceilings = [c for c in (count_field(doc, k) for k in _CEILINGS) if c is not None]
        req = ParsedRequest(
            model=model,
            stream=stream,
            max_tokens=max(ceilings) if ceilings and api != EMBEDDINGS else None,
            multiplier=_multiplier(api, doc),
            extra_input_tokens=_unseen_input(api, doc, model),
            body=doc,
        )
        if stream and api in (CHAT, COMPLETIONS):
            options = optional_object(doc, "stream_options")
            if not (options or {}).get("include_usage"):
                # Without this the stream carries no usage at all; the client did not ask for
                # it, so the accountant hides the extra chunk again.
                doc["stream_options"] = {**(options or {}), "include_usage": True}
                req.rewritten = json.dumps(doc, separators=(",", ":")).encode()
                req.strip_usage = True
        return req

    def response_usage(self, api: str, doc: Any) -> Reported:
        """See Provider.response_usage."""
        if not isinstance(doc, dict):
            return Reported()
        if api == RESPONSES and isinstance(doc.get("response"), dict):
            doc = doc["response"]
        reader = UsageReader()
        raw = reader.obj(doc, "usage")
        return reader.reported(_usage(raw, reader) if raw else None, doc.get("model"))

    def usage_from_response(self, api: str, doc: Any) -> tuple[Usage | None, str | None]:
        """See Provider.usage_from_response."""
        reported = self.response_usage(api, doc)
        return reported.usage, reported.model

    def stream_accountant(self, api: str, request: ParsedRequest) -> StreamAccountant:
        """See Provider.stream_accountant."""
        whole = functools.partial(self.response_usage, api)
        if api == RESPONSES:
            return SSEAccountant(
                _is_response_done,
                self._reduce_responses,
                _delta_text,
                _is_response_done,
                whole=whole,
                max_event_bytes=RESPONSE_EVENT_BYTES,
            )
        return SSEAccountant(
            _carries_usage,
            _reduce_chunks,
            _delta_text,
            lambda data: data == "[DONE]",
            drop=_is_usage_only_chunk if request.strip_usage else None,
            whole=whole,
        )

    def _reduce_responses(self, docs: list[Any]) -> Reported:
        # The terminal event (response.completed, .incomplete, .failed) carries the response.
        found = Reported()
        for d in docs:
            reported = self.response_usage(RESPONSES, d)
            if reported.usage is not None or found.usage is None:
                found = reported
        return found

    def prompt_text(self, api: str, doc: Any) -> str:
        """See Provider.prompt_text. Tool definitions and output schemas count as their JSON."""
        if not isinstance(doc, dict):
            return ""
        parts = visible_text([doc.get(k) for k in ("instructions", "messages", "prompt", "input", "suffix")])
        for key in ("tools", "functions", "response_format"):
            parts.append(json_text(doc.get(key)))
        if isinstance(doc.get("text"), dict):  # responses: {"format": {"type": "json_schema", ...}}
            parts.append(json_text(doc["text"]))
        return "\n".join(p for p in parts if p)

    def transform(self, api: str, doc: dict[str, Any], path: str, change: Change) -> tuple[bool, str | None]:
        """See Provider.transform."""
        changed = False
        if change.model and doc.get("model") != change.model:
            doc["model"] = change.model
            changed = True
        if change.max_tokens is not None and api != EMBEDDINGS:
            if api == RESPONSES:
                changed |= clamp(doc, "max_output_tokens", change.max_tokens)
            else:
                # Clamp whichever field the client used; a request with neither gets the newer one
                # (o-series models refuse max_tokens).
                present = [k for k in ("max_completion_tokens", "max_tokens") if k in doc] or [
                    "max_completion_tokens"
                ]
                for key in present:
                    changed |= clamp(doc, key, change.max_tokens)
        if change.system_prompt:
            if api == RESPONSES:
                prior = doc.get("instructions")
                doc["instructions"] = change.system_prompt + (
                    f"\n\n{prior}" if isinstance(prior, str) and prior else ""
                )
                changed = True
            elif api == CHAT and isinstance(doc.get("messages"), list):
                doc["messages"].insert(0, {"role": "system", "content": change.system_prompt})
                changed = True
        return changed, None

    def error_body(self, status: int, message: str) -> bytes:
        """See Provider.error_body."""
        etype, code = _ERROR_TYPES.get(status, ("api_error", None))
        return json.dumps(
            {"error": {"message": message, "type": etype, "param": None, "code": code}}
        ).encode()


def _usage(raw: dict[str, Any], reader: UsageReader) -> Usage:
    # Chat/completions/embeddings name them prompt/completion; the Responses API input/output.
    chat_names = raw.get("prompt_tokens") is not None or raw.get("completion_tokens") is not None
    inp = reader.get(raw, "prompt_tokens" if chat_names else "input_tokens")
    out = reader.get(raw, "completion_tokens" if chat_names else "output_tokens")
    in_details = reader.obj(raw, "prompt_tokens_details" if chat_names else "input_tokens_details")
    out_details = reader.obj(raw, "completion_tokens_details" if chat_names else "output_tokens_details")
    return reader.usage(
        Usage(
            input_tokens=inp,
            cached_input_tokens=reader.get(in_details, "cached_tokens"),
            # GPT-5.6 and later report prompt-cache writes, a part of the input billed at its own rate.
            cache_write_tokens=reader.get(in_details, "cache_write_tokens"),
            output_tokens=out,
            reasoning_tokens=reader.get(out_details, "reasoning_tokens"),
        )
    )


def _reduce_chunks(docs: list[Any]) -> Reported:
    # Only the final chunk carries usage; a model name may come on any chunk.
    return last_usage(docs, "model", "usage", _usage)


def _multiplier(api: str, doc: dict[str, Any]) -> int:
    """How many completions the request is billed for, each up to the output ceiling."""
    if api == CHAT:
        return count_field(doc, "n", maximum=MAX_N) or 1
    if api == COMPLETIONS:
        # best_of completions are generated per prompt and the best n returned (best_of >= n);
        # a list of prompts is a batch, each prompt getting its own.
        n = count_field(doc, "n", maximum=MAX_N) or 1
        best_of = count_field(doc, "best_of", maximum=MAX_BEST_OF) or 1
        return max(n, best_of) * _prompt_count(doc.get("prompt"))
    return 1


def _prompt_count(prompt: Any) -> int:
    """How many prompts a completions `prompt` holds: a string, a token array, or a list of either."""
    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
        return len(prompt)
    return 1


def _token_ids(value: Any) -> int:
    """Tokens given as ids rather than text (completions `prompt`, embeddings `input`)."""
    if not isinstance(value, list):
        return 0
    if all(isinstance(t, int) for t in value):
        return len(value)
    return sum(len(v) for v in value if isinstance(v, list))


def _unseen_input(api: str, doc: dict[str, Any], model: str) -> int:
    """A worst case in tokens for the input of a request that tiktoken cannot read."""
    if api in (COMPLETIONS, EMBEDDINGS):
        return capped(_token_ids(doc.get("prompt" if api == COMPLETIONS else "input")))
    image = IMAGE_TOKENS_4O_MINI if model.startswith("gpt-4o-mini") else IMAGE_TOKENS
    total = 0
    files = False
    upstream = any(
        doc.get(k) is not None for k in ("previous_response_id", "conversation", "web_search_options")
    )
    if api == RESPONSES and isinstance(doc.get("prompt"), dict):  # a stored prompt template
        upstream = True
    for part in walk_dicts(doc.get("messages"), doc.get("input")):
        kind = part.get("type")
        if kind in ("image_url", "input_image"):
            total += image
        elif kind == "input_audio":
            audio = part.get("input_audio")
            data = audio.get("data") if isinstance(audio, dict) else part.get("data")
            total += (
                -(-len(data) // AUDIO_B64_CHARS_PER_TOKEN)
                if isinstance(data, str)
                else AUDIO_REFERENCE_TOKENS
            )
        elif kind in ("file", "input_file"):
            files = True
        elif kind == "item_reference":
            upstream = True
        elif part.get("role") == "assistant" and isinstance(part.get("audio"), dict):
            total += AUDIO_REFERENCE_TOKENS
    if files:
        total += PDF_PAGES_PER_REQUEST * (image + PDF_TEXT_TOKENS_PER_PAGE)
    tools = doc.get("tools")
    if isinstance(tools, list) and any(
        not (isinstance(t, dict) and t.get("type") in _CLIENT_TOOLS) for t in tools
    ):
        upstream = True  # web search, file search, code interpreter, MCP: results billed as input
    if upstream:
        total += UPSTREAM_CONTEXT_TOKENS
    return capped(total)


def _carries_usage(data: str) -> bool:
    # Chunks say "usage":null until the last one; only a usage object is worth decoding.
    i = data.find('"usage"')
    if i < 0:
        return False
    rest = data[i + 7 : i + 12].lstrip(" :")
    return rest.startswith("{")


def _is_usage_only_chunk(data: str) -> bool:
    if not _carries_usage(data):
        return False
    try:
        doc = load_response_json(data)
    except JSONRejected:
        return False
    # The chunk include_usage adds: a usage object and no choices, nothing the client asked for.
    return isinstance(doc, dict) and isinstance(doc.get("usage"), dict) and not doc.get("choices")


def _is_response_done(data: str) -> bool:
    return '"response.completed"' in data or '"response.incomplete"' in data or '"response.failed"' in data


def _delta_text(doc: Any) -> list[str]:
    if not isinstance(doc, dict):
        return []
    if "choices" in doc:
        return collect_text(doc.get("choices"), _DELTA_KEYS)
    if isinstance(doc.get("type"), str) and doc["type"].endswith(".delta"):
        delta = doc.get("delta")
        return [delta] if isinstance(delta, str) else []
    return []
