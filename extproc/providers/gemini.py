"""Google Gemini's generateContent wire protocol (Generative Language API)."""

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
)
from extproc.usage import Usage, as_int

GENERATE = "generateContent"
STREAM_GENERATE = "streamGenerateContent"

_PROMPT_KEYS = frozenset({"text"})
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def split_model_path(path: str) -> tuple[str, str] | None:
    """`/v1beta/models/{model}:{method}` -> (model, method)."""
    for prefix in ("/v1beta/models/", "/v1/models/", "/v1alpha/models/"):
        if path.startswith(prefix):
            model, sep, method = path[len(prefix) :].rpartition(":")
            if sep and model:
                return model, method
    return None


class Gemini:
    """generativelanguage.googleapis.com."""

    name = "gemini"

    def api_for(self, method: str, path: str) -> str | None:
        """See Provider.api_for."""
        if method != "POST":
            return None
        parts = split_model_path(path)
        if parts and parts[1] in (GENERATE, STREAM_GENERATE):
            return parts[1]
        return None

    def is_free(self, method: str, path: str) -> bool:
        """See Provider.is_free."""
        parts = split_model_path(path)
        return method in FREE_METHODS or (parts is not None and parts[1] == "countTokens")

    def auth_headers(self, secret: str) -> list[tuple[str, str]]:
        """See Provider.auth_headers."""
        return [("x-goog-api-key", secret)]

    def parse_request(self, api: str, path: str, body: bytes) -> ParsedRequest:
        """See Provider.parse_request."""
        doc = load_json_object(body)
        contents = doc.get("contents")
        if not isinstance(contents, list | dict):
            raise BadRequest("* GenerateContentRequest.contents: contents is not specified")
        config = doc.get("generationConfig") or doc.get("generation_config") or {}
        if not isinstance(config, dict):
            raise BadRequest("generationConfig must be an object")
        max_tokens = config.get("maxOutputTokens", config.get("max_output_tokens"))
        parts = split_model_path(path)
        return ParsedRequest(
            model=parts[0] if parts else None,
            stream=api == STREAM_GENERATE,
            max_tokens=max_tokens if isinstance(max_tokens, int) else None,
            body=doc,
        )

    def usage_from_response(self, api: str, doc: Any) -> tuple[Usage | None, str | None]:
        """See Provider.usage_from_response. A non-SSE stream answer is a JSON array of chunks."""
        if isinstance(doc, list):
            return _reduce(doc)
        return _reduce([doc])

    def stream_accountant(self, api: str, request: ParsedRequest) -> StreamAccountant:
        """See Provider.stream_accountant."""
        # The last chunk of a generation carries its finishReason.
        return SSEAccountant(
            lambda data: '"usageMetadata"' in data,
            _reduce,
            _delta_text,
            lambda data: '"finishReason"' in data,
        )

    def prompt_text(self, api: str, doc: Any) -> str:
        """See Provider.prompt_text."""
        if not isinstance(doc, dict):
            return ""
        parts = [doc.get(k) for k in ("systemInstruction", "system_instruction", "contents", "tools")]
        return "\n".join(collect_text([p for p in parts if p is not None], _PROMPT_KEYS))

    def transform(self, api: str, doc: dict[str, Any], path: str, change: Change) -> tuple[bool, str | None]:
        """See Provider.transform. The model is part of the path, not the body."""
        changed = False
        new_path = None
        parts = split_model_path(path)
        if change.model and parts and parts[0] != change.model:
            prefix = path[: path.index("/models/") + len("/models/")]
            new_path = f"{prefix}{change.model}:{parts[1]}"
        if change.max_tokens is not None:
            key = "generation_config" if "generation_config" in doc else "generationConfig"
            config = doc.setdefault(key, {})
            if isinstance(config, dict):
                out_key = "max_output_tokens" if "max_output_tokens" in config else "maxOutputTokens"
                changed |= clamp(config, out_key, change.max_tokens)
        if change.system_prompt:
            key = "system_instruction" if "system_instruction" in doc else "systemInstruction"
            prior = doc.get(key)
            prior_parts = prior.get("parts") if isinstance(prior, dict) else None
            doc[key] = {
                "parts": [
                    {"text": change.system_prompt},
                    *(prior_parts if isinstance(prior_parts, list) else []),
                ]
            }
            changed = True
        return changed, new_path

    def error_body(self, status: int, message: str) -> bytes:
        """See Provider.error_body."""
        name = _STATUS_NAMES.get(status, "UNKNOWN")
        return json.dumps({"error": {"code": status, "message": message, "status": name}}).encode()


def _reduce(docs: list[Any]) -> tuple[Usage | None, str | None]:
    # usageMetadata is cumulative: the last one seen is the figure to bill.
    usage: Usage | None = None
    model = None
    for d in docs:
        if not isinstance(d, dict):
            continue
        model = d.get("modelVersion") or model
        meta = d.get("usageMetadata")
        if isinstance(meta, dict):
            thoughts = as_int(meta.get("thoughtsTokenCount"))
            usage = Usage(
                input_tokens=as_int(meta.get("promptTokenCount")),
                cached_input_tokens=as_int(meta.get("cachedContentTokenCount")),
                output_tokens=as_int(meta.get("candidatesTokenCount")) + thoughts,
                reasoning_tokens=thoughts,
            )
    return usage, model


def _delta_text(doc: Any) -> list[str]:
    if not isinstance(doc, dict):
        return []
    out = collect_text(doc.get("candidates"), _PROMPT_KEYS)
    # Function-call arguments are output tokens too, but they are JSON, not "text" fields.
    out.extend(json.dumps(call) for call in _function_call_args(doc))
    return out


def _function_call_args(doc: dict[str, Any]) -> list[Any]:
    calls = []
    for cand in doc.get("candidates") or []:
        content = cand.get("content") if isinstance(cand, dict) else None
        for part in (content or {}).get("parts") or []:
            if isinstance(part, dict) and isinstance(part.get("functionCall"), dict):
                calls.append(part["functionCall"].get("args") or {})
    return calls
