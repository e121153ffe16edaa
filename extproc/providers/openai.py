"""OpenAI's wire protocol: chat completions, completions, responses and embeddings."""

from __future__ import annotations

import json
from typing import Any

from extproc.providers.base import (
    FREE_METHODS,
    BadRequest,
    Change,
    ParsedRequest,
    SSEAccountant,
    StreamAccountant,
    clamp,
    collect_text,
    load_json_object,
    optional_int,
    optional_str,
    stream_flag,
)
from extproc.usage import Usage, as_int

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
_PROMPT_KEYS = frozenset({"content", "text", "input", "prompt", "instructions", "arguments"})
_DELTA_KEYS = frozenset({"content", "text", "arguments", "delta", "refusal"})
_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_denied", "model_not_allowed"),
    404: ("invalid_request_error", "not_found"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_exceeded", "rate_limit_exceeded"),
}


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
        max_tokens = optional_int(doc, "max_completion_tokens", "max_tokens", "max_output_tokens")
        req = ParsedRequest(model=model, stream=stream, max_tokens=max_tokens, body=doc)
        if stream and api in (CHAT, COMPLETIONS):
            options = doc.get("stream_options")
            if options is not None and not isinstance(options, dict):
                raise BadRequest("'stream_options' must be an object")
            if not (options or {}).get("include_usage"):
                # Without this the stream carries no usage at all; the client did not ask for
                # it, so the accountant hides the extra chunk again.
                doc["stream_options"] = {**(options or {}), "include_usage": True}
                req.rewritten = json.dumps(doc, separators=(",", ":")).encode()
                req.strip_usage = True
        return req

    def usage_from_response(self, api: str, doc: Any) -> tuple[Usage | None, str | None]:
        """See Provider.usage_from_response."""
        if not isinstance(doc, dict):
            return None, None
        if api == RESPONSES and isinstance(doc.get("response"), dict):
            doc = doc["response"]
        model = doc.get("model") if isinstance(doc.get("model"), str) else None
        raw = doc.get("usage")
        if not isinstance(raw, dict):
            return None, model
        return _usage(raw), model

    def stream_accountant(self, api: str, request: ParsedRequest) -> StreamAccountant:
        """See Provider.stream_accountant."""
        if api == RESPONSES:
            return SSEAccountant(_is_response_done, self._reduce_responses, _delta_text, _is_response_done)
        return SSEAccountant(
            _carries_usage,
            self._reduce_chunks,
            _delta_text,
            lambda data: data == "[DONE]",
            drop=_is_usage_only_chunk if request.strip_usage else None,
        )

    def _reduce_chunks(self, docs: list[Any]) -> tuple[Usage | None, str | None]:
        usage: Usage | None = None
        model = None
        for d in docs:
            if isinstance(d, dict) and isinstance(d.get("usage"), dict):
                usage = _usage(d["usage"])
                model = d.get("model") or model
        return usage, model

    def _reduce_responses(self, docs: list[Any]) -> tuple[Usage | None, str | None]:
        usage: Usage | None = None
        model = None
        for d in docs:
            u, m = self.usage_from_response(RESPONSES, d)
            usage, model = u or usage, m or model
        return usage, model

    def prompt_text(self, api: str, doc: Any) -> str:
        """See Provider.prompt_text."""
        if not isinstance(doc, dict):
            return ""
        parts = [doc.get(k) for k in ("messages", "prompt", "input", "instructions", "tools")]
        return "\n".join(collect_text([p for p in parts if p is not None], _PROMPT_KEYS))

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


def _usage(raw: dict[str, Any]) -> Usage:
    # Chat/completions/embeddings name them prompt/completion; the Responses API input/output.
    inp = as_int(raw.get("prompt_tokens", raw.get("input_tokens")))
    out = as_int(raw.get("completion_tokens", raw.get("output_tokens")))
    in_details = raw.get("prompt_tokens_details") or raw.get("input_tokens_details") or {}
    out_details = raw.get("completion_tokens_details") or raw.get("output_tokens_details") or {}
    return Usage(
        input_tokens=inp,
        cached_input_tokens=as_int(in_details.get("cached_tokens")),
        output_tokens=out,
        reasoning_tokens=as_int(out_details.get("reasoning_tokens")),
    )


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
        doc = json.loads(data)
    except ValueError:
        return False
    return isinstance(doc, dict) and not doc.get("choices")


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
