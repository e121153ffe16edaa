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


def _logged(logger_name: str, exc: BaseException, message: str) -> str:
    import io
    import logging

    from extproc import log

    log.configure("INFO")
    stream = io.StringIO()
    handler = logging.getLogger().handlers[0]
    handler.setStream(stream)  # type: ignore[attr-defined]
    try:
        raise exc
    except BaseException:
        logging.getLogger(logger_name).exception(message)
    return stream.getvalue()


def test_a_key_quoted_in_a_logged_exception_is_redacted_in_the_traceback_too() -> None:
    key = wrapped_keys.generate()
    out = _logged("some.library", ValueError(f"bad header authorization: Bearer {key}"), "it broke")
    assert "Traceback" in out and "ValueError" in out and key not in out


def test_grpc_failing_to_send_the_status_of_an_ended_stream_logs_no_traceback() -> None:
    class ExecuteBatchError(Exception):
        pass

    err = ExecuteBatchError('Failed "execute_batch": (<SendStatusFromServerOperation object at 0x1>,)')
    out = _logged("grpc._cython.cygrpc", err, "ExecuteBatchError raised in core by servicer method [/x]")
    assert "Traceback" not in out


def test_other_grpc_errors_keep_their_traceback() -> None:
    out = _logged("grpc._cython.cygrpc", RuntimeError("boom"), "Unexpected error raised by servicer")
    assert "Traceback" in out and "boom" in out
