"""Translation between Exchange replies and Envoy ext_proc protobuf messages."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2

from extproc.exchange import HEADERS_READ, BodyMode, Reply

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_MODES = {
    "BUFFERED": processing_mode_pb2.ProcessingMode.BUFFERED,
    "STREAMED": processing_mode_pb2.ProcessingMode.STREAMED,
}
# mode_override replaces the whole mode, so it must restate the phases the filter config sends.
_SEND = processing_mode_pb2.ProcessingMode.SEND
_SKIP = processing_mode_pb2.ProcessingMode.SKIP


def header_map(headers: pb.HttpHeaders) -> dict[str, str]:
    """The headers an Exchange reads, as a dict; values arrive as raw bytes."""
    return {
        h.key: h.raw_value.decode("latin-1") if h.raw_value else h.value
        for h in headers.headers.headers
        if h.key in HEADERS_READ
    }


def _mutation(reply: Reply) -> pb.HeaderMutation | None:
    if not reply.set_headers and not reply.remove_headers:
        return None
    return pb.HeaderMutation(
        set_headers=[_header(k, v) for k, v in reply.set_headers], remove_headers=reply.remove_headers
    )


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode("latin-1")), append_action=_OVERWRITE
    )


def _mode(
    request_body: BodyMode | None, response_body: BodyMode | None
) -> processing_mode_pb2.ProcessingMode:
    none = processing_mode_pb2.ProcessingMode.NONE
    return processing_mode_pb2.ProcessingMode(
        request_header_mode=_SEND,
        response_header_mode=_SEND,
        request_body_mode=_MODES[request_body] if request_body else none,
        response_body_mode=_MODES[response_body] if response_body else none,
        request_trailer_mode=_SKIP,
        response_trailer_mode=_SKIP,
    )


def immediate(reply: Reply) -> pb.ProcessingResponse:
    """An immediate response that ends the request at the proxy."""
    assert reply.immediate_status is not None
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=reply.immediate_status),
            headers=_mutation(reply),
            body=reply.body or b"",
            details="spendgate_rejected",
        )
    )


def request_headers(reply: Reply) -> pb.ProcessingResponse:
    """The reply to the request-headers phase."""
    if reply.immediate_status is not None:
        return immediate(reply)
    resp = pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(
            response=pb.CommonResponse(
                header_mutation=_mutation(reply), clear_route_cache=reply.clear_route_cache
            )
        )
    )
    if reply.request_body_mode:
        resp.mode_override.CopyFrom(_mode(reply.request_body_mode, None))
    return resp


def request_body(reply: Reply) -> pb.ProcessingResponse:
    """The reply to the buffered request-body phase."""
    if reply.immediate_status is not None:
        return immediate(reply)
    common = pb.CommonResponse(header_mutation=_mutation(reply), clear_route_cache=reply.clear_route_cache)
    if reply.body is not None:
        common.body_mutation.body = reply.body
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))


def response_headers(reply: Reply) -> pb.ProcessingResponse:
    """The reply to the response-headers phase, switching on body processing when needed."""
    resp = pb.ProcessingResponse(
        response_headers=pb.HeadersResponse(response=pb.CommonResponse(header_mutation=_mutation(reply)))
    )
    if reply.response_body_mode:
        resp.mode_override.CopyFrom(_mode(None, reply.response_body_mode))
    return resp


_EMPTY_RESPONSE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse()))


def response_body(reply: Reply | None) -> pb.ProcessingResponse:
    """The reply to one response-body chunk; usually nothing changes."""
    if reply is None:
        return _EMPTY_RESPONSE_BODY
    common = pb.CommonResponse(header_mutation=_mutation(reply))
    if reply.body is not None:
        common.body_mutation.body = reply.body
    return pb.ProcessingResponse(response_body=pb.BodyResponse(response=common))


def unchanged(phase: str | None) -> pb.ProcessingResponse:
    """A reply to `phase` that lets it go on as it is (every phase must be answered)."""
    if phase == "request_headers":
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse())
    if phase == "request_body":
        return pb.ProcessingResponse(request_body=pb.BodyResponse())
    if phase == "response_headers":
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse())
    if phase == "response_body":
        return _EMPTY_RESPONSE_BODY
    if phase == "request_trailers":
        return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
    return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


def failed(phase: str | None, reply: Reply | None) -> pb.ProcessingResponse:
    """The reply to a phase the Exchange failed on: its refusal, or the phase unchanged."""
    if reply is not None and reply.immediate_status is not None:
        return immediate(reply)
    return unchanged(phase)
