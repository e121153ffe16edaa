"""Reservations cover the bill: for any request a parser accepts, what it reserves is at least what
the provider could charge for it.

The reference bounds here are computed from each provider's documented pricing rules (image
tiles and patches, audio seconds, PDF pages), independently of the parsers' constants, from
request parts generated with known dimensions, durations and page counts.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from extproc import tokens
from extproc.providers import PROVIDERS
from extproc.providers.base import ParsedRequest, count_prompt

openai, anthropic, gemini = PROVIDERS["openai"], PROVIDERS["anthropic"], PROVIDERS["gemini"]

WORDS = st.lists(
    st.sampled_from(["alpha", "beta", "gamma", "delta", "42", "über", "naïve", "東京"]),
    min_size=1,
    max_size=12,
)
TEXT = WORDS.map(" ".join)
SIDE = st.one_of(st.integers(1, 8000), st.sampled_from([1, 768, 2048, 3072, 8000]))
DIMENSIONS = st.tuples(SIDE, SIDE)
# Audio and video at no less than 8 kbit/s, the lowest bitrate the bounds promise to cover.
SECONDS = st.integers(1, 120)
BITRATE = st.one_of(st.just(1_000), st.integers(1_000, 16_000))  # bytes a second


def b64_of(nbytes: int) -> str:
    return base64.b64encode(b"\0" * nbytes).decode()


@dataclass
class Bill:
    """What the provider could charge, as the reference computes it."""

    texts: list[str] = field(default_factory=list)
    media_tokens: int = 0

    def text_tokens(self) -> int:
        return sum(tokens.count(t) for t in self.texts)


def reserved_input(provider: Any, api: str, req: ParsedRequest) -> int:
    return count_prompt(provider, api, req.body) + req.extra_input_tokens


# -- OpenAI ------------------------------------------------------------------------------------
def openai_image_tokens(model: str, w: int, h: int) -> int:
    """OpenAI's images-and-vision guide, "Calculating costs", at high detail (the dearest)."""
    if model.startswith("gpt-4.1-nano") or model.startswith("gpt-4.1-mini") or model.startswith("o4-mini"):
        factor = {"gpt-4.1-nano": 2.46, "gpt-4.1-mini": 1.62, "o4-mini": 1.72}[
            next(k for k in ("gpt-4.1-nano", "gpt-4.1-mini", "o4-mini") if model.startswith(k))
        ]
        patches = math.ceil(w / 32) * math.ceil(h / 32)
        if patches > 1536:
            scale = math.sqrt(1536 * 32 * 32 / (w * h))
            patches = min(1536, math.ceil(w * scale / 32) * math.ceil(h * scale / 32))
        return math.ceil(patches * factor)
    base_tokens, tile_tokens = (2833, 5667) if model.startswith("gpt-4o-mini") else (85, 170)
    if max(w, h) > 2048:
        ratio = 2048 / max(w, h)
        w, h = max(1, int(w * ratio)), max(1, int(h * ratio))
    if min(w, h) > 768:
        ratio = 768 / min(w, h)
        w, h = max(1, int(w * ratio)), max(1, int(h * ratio))
    return base_tokens + tile_tokens * math.ceil(w / 512) * math.ceil(h / 512)


OPENAI_MODELS = st.sampled_from(["gpt-4o", "gpt-4o-mini", "gpt-4.1-nano", "gpt-4.1-mini", "o4-mini", "o3"])


@st.composite
def openai_chat(draw: st.DrawFn) -> tuple[dict[str, Any], Bill, int]:
    model = draw(OPENAI_MODELS)
    bill = Bill()
    content: list[dict[str, Any]] = []
    # One kind of media per request, so that one kind's margin cannot hide another's shortfall.
    media = draw(st.sampled_from(["image", "audio"]))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["text", media]))
        if kind == "text":
            text = draw(TEXT)
            bill.texts.append(text)
            content.append({"type": "text", "text": text})
        elif kind == "image":
            w, h = draw(DIMENSIONS)
            bill.media_tokens += openai_image_tokens(model, w, h)
            detail = draw(st.sampled_from(["low", "high", "auto"]))
            content.append(
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": detail}}
            )
        else:
            seconds, rate = draw(SECONDS), draw(BITRATE)
            bill.media_tokens += 10 * seconds  # one token per 100 ms of audio
            content.append(
                {"type": "input_audio", "input_audio": {"data": b64_of(seconds * rate), "format": "mp3"}}
            )
    system = draw(TEXT)
    bill.texts.append(system)
    n = draw(st.integers(1, 8))
    ceiling = draw(st.integers(1, 100_000))
    doc = {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": content}],
        "n": n,
        draw(st.sampled_from(["max_tokens", "max_completion_tokens"])): ceiling,
    }
    return doc, bill, n * ceiling


@settings(max_examples=200, deadline=None, database=None)
@given(openai_chat())
def test_openai_chat_reservation_covers_the_bill(case: tuple[dict[str, Any], Bill, int]) -> None:
    doc, bill, output = case
    req = openai.parse_request("chat.completions", "", json.dumps(doc).encode())
    assert reserved_input(openai, "chat.completions", req) >= bill.text_tokens() + bill.media_tokens
    assert req.max_tokens is not None and req.max_tokens * req.multiplier >= output


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.lists(TEXT, min_size=1, max_size=4),
    st.integers(1, 5),
    st.integers(1, 20),
    st.integers(1, 5000),
    st.booleans(),
)
def test_openai_completions_reservation_covers_every_candidate(
    prompts: list[str], n: int, best_of: int, ceiling: int, as_list: bool
) -> None:
    best_of = max(best_of, n)  # the API refuses best_of < n
    doc = {
        "model": "m",
        "prompt": prompts if as_list else prompts[0],
        "n": n,
        "best_of": best_of,
        "max_tokens": ceiling,
    }
    req = openai.parse_request("completions", "", json.dumps(doc).encode())
    billed_prompts = prompts if as_list else prompts[:1]
    assert req.max_tokens is not None and req.max_tokens * req.multiplier >= ceiling * best_of * len(
        billed_prompts
    )
    assert reserved_input(openai, "completions", req) >= sum(tokens.count(p) for p in billed_prompts)


# -- Anthropic ---------------------------------------------------------------------------------
def anthropic_image_tokens(w: int, h: int) -> int:
    """Anthropic's vision guide: shrink to the native maximum, then one token per 28x28 patch.
    The largest native size any model has is 2576 px on the long edge (Opus 4.7)."""
    if max(w, h) > 2576:
        ratio = 2576 / max(w, h)
        w, h = max(1, math.floor(w * ratio)), max(1, math.floor(h * ratio))
    return math.ceil(w / 28) * math.ceil(h / 28)


@st.composite
def anthropic_messages(draw: st.DrawFn) -> tuple[dict[str, Any], Bill, int]:
    bill = Bill()
    content: list[dict[str, Any]] = []
    pages_left = 100  # a request holds at most 100 PDF pages
    media = draw(st.sampled_from(["image", "pdf"]))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["text", media]))
        if kind == "text":
            text = draw(TEXT)
            bill.texts.append(text)
            content.append({"type": "text", "text": text})
        elif kind == "image":
            w, h = draw(DIMENSIONS)
            bill.media_tokens += anthropic_image_tokens(w, h)
            content.append(
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}}
            )
        elif pages_left:
            pages = draw(st.integers(1, pages_left))
            pages_left -= pages
            # Each page: its text (at most 3,000 tokens) and an image of it (a letter page at
            # the largest native resolution).
            bill.media_tokens += pages * (3000 + anthropic_image_tokens(1992, 2576))
            content.append(
                {
                    "type": "document",
                    "source": {"type": "base64", "media_type": "application/pdf", "data": "AA"},
                }
            )
    tools = draw(st.booleans())
    if tools:
        bill.media_tokens += 530  # the largest tool-use system prompt in the tool use overview
    ceiling = draw(st.integers(1, 128_000))
    doc: dict[str, Any] = {
        "model": "claude-x",
        "max_tokens": ceiling,
        "messages": [{"role": "user", "content": content}],
    }
    if tools:
        doc["tools"] = [
            {"name": "lookup", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}
        ]
    return doc, bill, ceiling


@settings(max_examples=200, deadline=None, database=None)
@given(anthropic_messages())
def test_anthropic_reservation_covers_the_bill(case: tuple[dict[str, Any], Bill, int]) -> None:
    doc, bill, output = case
    req = anthropic.parse_request("messages", "", json.dumps(doc).encode())
    assert reserved_input(anthropic, "messages", req) >= bill.text_tokens() + bill.media_tokens
    assert req.max_tokens is not None and req.max_tokens * req.multiplier >= output


# -- Gemini ------------------------------------------------------------------------------------
def gemini_image_tokens(w: int, h: int) -> int:
    """Gemini token guide (2.x): 258 up to 384x384, else 258 per 768x768 tile; Gemini 3 at most
    2,240 (MEDIA_RESOLUTION_ULTRA_HIGH)."""
    tiles = 258 if w <= 384 and h <= 384 else 258 * math.ceil(w / 768) * math.ceil(h / 768)
    return max(tiles, 2240)


@st.composite
def gemini_generate(draw: st.DrawFn) -> tuple[dict[str, Any], Bill, int]:
    bill = Bill()
    parts: list[dict[str, Any]] = []
    media = draw(st.sampled_from(["image", "audio", "video"]))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["text", media]))
        if kind == "text":
            text = draw(TEXT)
            bill.texts.append(text)
            parts.append({"text": text})
        elif kind == "image":
            side = st.one_of(st.integers(1, 3072), st.sampled_from([384, 385, 3072]))
            w, h = draw(side), draw(side)
            bill.media_tokens += gemini_image_tokens(w, h)
            parts.append({"inlineData": {"mimeType": "image/jpeg", "data": "AAAA"}})
        else:
            seconds, rate = draw(SECONDS), draw(BITRATE)
            bill.media_tokens += seconds * (32 if kind == "audio" else 263 + 32)
            mime = "audio/mp3" if kind == "audio" else "video/mp4"
            parts.append({"inline_data": {"mime_type": mime, "data": b64_of(seconds * rate)}})
    candidates = draw(st.integers(1, 8))
    ceiling = draw(st.integers(1, 65_536))
    doc = {
        "contents": [{"role": "user", "parts": parts}],
        "generationConfig": {"candidateCount": candidates, "maxOutputTokens": ceiling},
    }
    return doc, bill, candidates * ceiling


@settings(max_examples=200, deadline=None, database=None)
@given(gemini_generate())
def test_gemini_reservation_covers_the_bill(case: tuple[dict[str, Any], Bill, int]) -> None:
    doc, bill, output = case
    path = "/v1beta/models/gemini-2.5-pro:generateContent"
    req = gemini.parse_request("generateContent", path, json.dumps(doc).encode())
    assert reserved_input(gemini, "generateContent", req) >= bill.text_tokens() + bill.media_tokens
    assert req.max_tokens is not None and req.max_tokens * req.multiplier >= output
