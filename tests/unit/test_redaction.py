"""Log redaction: credentials never survive into a log line."""

import secrets

from extproc import wrapped_keys
from extproc.log import redact


def test_wrapped_key_keeps_only_its_visible_prefix() -> None:
    key = wrapped_keys.generate()
    out = redact(f"key={key}")
    assert key not in out
    assert wrapped_keys.visible_prefix(key) in out


def test_openai_style_key_is_removed() -> None:
    tail = secrets.token_hex(8)
    assert tail not in redact("sk-proj-" + tail)


def test_anthropic_style_key_is_removed() -> None:
    tail = secrets.token_hex(8)
    assert tail not in redact("x-api-key: sk-ant-test-" + tail)


def test_google_style_key_is_removed() -> None:
    tail = secrets.token_hex(10)
    assert tail not in redact("key=AIzaSy" + tail)


def test_bearer_token_of_any_shape_is_removed() -> None:
    assert "opaque-token-42" not in redact("Authorization: Bearer opaque-token-42")
