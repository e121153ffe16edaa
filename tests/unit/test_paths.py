"""The canonical request path: one meaning, or a refusal."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.paths import UnsafePath, canonical_path

CHAT = "/v1/chat/completions"


@pytest.mark.parametrize(
    "variant",
    [
        "/v1/chat/completions/",
        "//v1/chat/completions",
        "/v1//chat///completions",
        "/v1/./chat/completions",
        "/v1/chat/./completions/.",
        "/v1/x/../chat/completions",
        "/v1/chat/completions/x/..",
        "/%76%31/chat/completions",
        "/v1/chat/complet%69ons",
    ],
)
def test_variants_of_a_path_have_its_canonical_form(variant: str) -> None:
    assert canonical_path(variant) == CHAT


def test_dot_dot_in_a_gemini_model_path_resolves_to_the_model_served() -> None:
    path = "/v1beta/models/gemini-2.5-flash/../gemini-2.5-pro:generateContent"
    assert canonical_path(path) == "/v1beta/models/gemini-2.5-pro:generateContent"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat%2Fcompletions",
        "/v1/chat%2fcompletions",
        "/v1beta/models/gemini-2.5-pro%3AgenerateContent",
        "/v1/chat/completions;x=1",
        "/v1/chat\\completions",
        "/v1/chat/completions%00",
        "/v1/chat/completions%25",
        "/v1/chat/completions%zz",
        "/v1/chat/completions%2",
        "/../v1/chat/completions",
        "/v1/chat/completions#frag",
        "/v1/chat/comp letions",
        "v1/chat/completions",
        "/" + "a" * 5000,
    ],
)
def test_a_path_with_no_single_meaning_is_refused(path: str) -> None:
    with pytest.raises(UnsafePath):
        canonical_path(path)


_segment = st.sampled_from(["", ".", "..", "v1", "chat", "completions", "%2F", "%41", "a;b", "%", "x"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_segment, max_size=8), st.booleans())
def test_a_canonical_path_is_its_own_canonical_form_and_has_no_dot_or_empty_segment(
    segments: list[str], trailing: bool
) -> None:
    raw = "/" + "/".join(segments) + ("/" if trailing else "")
    try:
        out = canonical_path(raw)
    except UnsafePath:
        return
    assert canonical_path(out) == out
    assert out == "/" or all(seg not in ("", ".", "..") for seg in out[1:].split("/"))
    assert "%" not in out and ";" not in out


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_text_is_either_canonicalised_or_refused_with_unsafe_path(text: str) -> None:
    with contextlib.suppress(UnsafePath):
        canonical_path("/" + text)
