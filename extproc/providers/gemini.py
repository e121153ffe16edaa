"""Google Gemini's generateContent wire protocol (Generative Language API)."""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from extproc.providers.base import (
    FREE_METHODS,
    UPSTREAM_CONTEXT_TOKENS,
    BadRequest,
    Change,
    ParsedRequest,
    Reported,
    SSEAccountant,
    StreamAccountant,
    UsageReader,
    capped,
    clamp,
    collect_text,
    count_field,
    either,
    json_text,
    last_usage,
    load_json_object,
    spelling,
    visible_text,
    walk_dicts,
)
from extproc.usage import Usage

GENERATE = "generateContent"
STREAM_GENERATE = "streamGenerateContent"

_TEXT_KEYS = frozenset({"text"})
_FINISHED = re.compile(r'"finishReason"\s*:\s*"')
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
# generationConfig.candidateCount: each candidate may run to maxOutputTokens, which bounds
# thinking and answer together. The documented range is 1-8.
MAX_CANDIDATES = 8

# -- input tiktoken cannot read: worst cases per part ------------------------------------------
# Images: Gemini 2.x counts an image up to 384x384 px as 258 tokens and a larger one as 258 per
# 768x768 tile; Gemini 3 at most 2,240 (media_resolution ULTRA_HIGH). 4,128 is 16 tiles, an
# image up to 3072x3072 px. Sources: the Gemini API token guide and media resolution guide.
IMAGE_TOKENS = 4_128
# Other inline data (audio, video, PDF) is billed by duration or pages, which only its size
# hints at: audio 32 tokens a second, video ~300 with its sound, a PDF page 258 (Gemini 2.x) to
# 1,120 (Gemini 3, high resolution). One token per 4 base64 characters (3 bytes) covers audio
# and video at any bitrate above 8 kbit/s and PDF pages averaging 3.3 KB at the highest setting.
INLINE_B64_CHARS_PER_TOKEN = 4
# Media by reference (fileData: an uploaded file, a YouTube URL) other than an image: nothing
# tells its length, and an hour of video is ~1M tokens. The context window of Gemini 2.5 and 3.
MEDIA_REFERENCE_TOKENS = 1_048_576
_FUNCTION_TOOLS = frozenset({"functionDeclarations", "function_declarations"})


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
        """See Provider.parse_request. Integers may come as decimal strings (protobuf JSON)."""
        doc = load_json_object(body)
        contents = doc.get("contents")
        if not isinstance(contents, list | dict):
            raise BadRequest("* GenerateContentRequest.contents: contents is not specified")
        config = either(doc, "generationConfig", "generation_config")
        if config is None:
            config = {}
        if not isinstance(config, dict):
            raise BadRequest("generationConfig must be an object")
        ceiling_key = spelling(config, "maxOutputTokens", "max_output_tokens")
        candidates_key = spelling(config, "candidateCount", "candidate_count")
        thinking = either(config, "thinkingConfig", "thinking_config")
        if thinking is not None:
            if not isinstance(thinking, dict):
                raise BadRequest("thinkingConfig must be an object")
            budget_key = spelling(thinking, "thinkingBudget", "thinking_budget")
            if budget_key is not None:
                # -1 asks for a dynamic budget, 0 turns thinking off; either way maxOutputTokens
                # bounds thinking and answer together, so the budget is only checked.
                count_field(thinking, budget_key, minimum=-1, strings=True)
        parts = split_model_path(path)
        return ParsedRequest(
            model=parts[0] if parts else None,
            stream=api == STREAM_GENERATE,
            max_tokens=count_field(config, ceiling_key, strings=True) if ceiling_key else None,
            multiplier=(
                count_field(config, candidates_key, maximum=MAX_CANDIDATES, strings=True) or 1
                if candidates_key
                else 1
            ),
            extra_input_tokens=_unseen_input(doc),
            body=doc,
        )

    def response_usage(self, api: str, doc: Any) -> Reported:
        """See Provider.response_usage. A non-SSE stream answer is a JSON array of chunks."""
        return _reduce(doc if isinstance(doc, list) else [doc])

    def usage_from_response(self, api: str, doc: Any) -> tuple[Usage | None, str | None]:
        """See Provider.usage_from_response."""
        reported = self.response_usage(api, doc)
        return reported.usage, reported.model

    def stream_accountant(self, api: str, request: ParsedRequest) -> StreamAccountant:
        """See Provider.stream_accountant."""
        # The last chunk of a generation carries its finishReason, as a string: a null one (or
        # the bare word) must not count a stream cut short as delivered whole.
        return SSEAccountant(
            lambda data: '"usageMetadata"' in data,
            _reduce,
            _delta_text,
            lambda data: _FINISHED.search(data) is not None,
            whole=functools.partial(self.response_usage, api),
        )

    def prompt_text(self, api: str, doc: Any) -> str:
        """See Provider.prompt_text. Tool declarations and response schemas count as their JSON."""
        if not isinstance(doc, dict):
            return ""
        parts = visible_text([doc.get(k) for k in ("systemInstruction", "system_instruction", "contents")])
        parts.append(json_text(doc.get("tools")))
        config = doc.get("generationConfig") or doc.get("generation_config")
        if isinstance(config, dict):
            for key in ("responseSchema", "response_schema", "responseJsonSchema", "response_json_schema"):
                parts.append(json_text(config.get(key)))
        return "\n".join(p for p in parts if p)

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


def _reduce(docs: list[Any]) -> Reported:
    # usageMetadata is cumulative: the last one seen is the figure to bill.
    return last_usage(docs, "modelVersion", "usageMetadata", _usage)


def _usage(meta: dict[str, Any], reader: UsageReader) -> Usage:
    thoughts = reader.get(meta, "thoughtsTokenCount")
    return reader.usage(
        Usage(
            # Input that tools Google runs (search, URL context) put before the model is
            # reported apart from the prompt and billed as input too.
            input_tokens=reader.get(meta, "promptTokenCount") + reader.get(meta, "toolUsePromptTokenCount"),
            cached_input_tokens=reader.get(meta, "cachedContentTokenCount"),
            output_tokens=reader.get(meta, "candidatesTokenCount") + thoughts,
            reasoning_tokens=thoughts,
        )
    )


def _unseen_input(doc: dict[str, Any]) -> int:
    """A worst case in tokens for the input of a request that tiktoken cannot read."""
    total = 0
    roots = [doc.get(k) for k in ("systemInstruction", "system_instruction", "contents")]
    for part in walk_dicts(*roots):
        inline = either(part, "inlineData", "inline_data")
        if isinstance(inline, dict):
            data = inline.get("data")
            if _is_image(inline) or not isinstance(data, str):
                total += IMAGE_TOKENS
            else:
                total += max(-(-len(data) // INLINE_B64_CHARS_PER_TOKEN), IMAGE_TOKENS)
        reference = either(part, "fileData", "file_data")
        if isinstance(reference, dict):
            total += IMAGE_TOKENS if _is_image(reference) else MEDIA_REFERENCE_TOKENS
    tools = doc.get("tools")
    server_tools = isinstance(tools, list) and any(
        not (isinstance(t, dict) and t and set(t) <= _FUNCTION_TOOLS) for t in tools
    )
    if server_tools or either(doc, "cachedContent", "cached_content") is not None:
        total += UPSTREAM_CONTEXT_TOKENS
    return capped(total)


def _is_image(blob: dict[str, Any]) -> bool:
    mime = blob.get("mimeType", blob.get("mime_type"))
    return isinstance(mime, str) and mime.lower().startswith("image/")


def _delta_text(doc: Any) -> list[str]:
    if not isinstance(doc, dict):
        return []
    out = collect_text(doc.get("candidates"), _TEXT_KEYS)
    # Function-call arguments are output tokens too, but they are JSON, not "text" fields.
    out.extend(json_text(call) for call in _function_call_args(doc))
    return out


def _function_call_args(doc: dict[str, Any]) -> list[Any]:
    calls = []
    candidates = doc.get("candidates")
    for cand in candidates if isinstance(candidates, list) else []:
        content = cand.get("content") if isinstance(cand, dict) else None
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in parts if isinstance(parts, list) else []:
            if isinstance(part, dict) and isinstance(part.get("functionCall"), dict):
                calls.append(part["functionCall"].get("args") or {})
    return calls
