"""The ext_proc gRPC servicer: it only dispatches Envoy's phases to an Exchange."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc import envoy_messages as msg
from extproc.admission import Gatekeeper
from extproc.exchange import Exchange, Reply
from extproc.failover import HOST_METADATA, PHASE_METADATA, UpstreamAttempt
from extproc.metrics import Metrics
from extproc.policy.budgets import Admission

log = structlog.get_logger("spendgate.servicer")

# Request bodies above this size are parsed and counted on a worker thread.
_INLINE_BODY_BYTES = 64 * 1024


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """One gRPC stream per HTTP request; one Exchange per stream."""

    def __init__(
        self,
        new_exchange: Callable[[], Exchange],
        gatekeeper: Gatekeeper,
        metrics: Metrics,
        new_attempt: Callable[[], UpstreamAttempt],
    ) -> None:
        self._new_exchange = new_exchange
        self._new_attempt = new_attempt
        self._gatekeeper = gatekeeper
        self._metrics = metrics

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        """Answer every phase Envoy sends; finalise the request however the stream ends."""
        if (PHASE_METADATA, "upstream") in (context.invocation_metadata() or ()):
            async for resp in self._upstream(request_iterator):
                yield resp
            return
        ex = self._new_exchange()
        try:
            async for req in request_iterator:
                phase = req.WhichOneof("request")
                try:
                    resp = await self._answer(ex, req, phase)
                except Exception as exc:
                    # A defect must neither leave the phase unanswered (Envoy would then forward the
                    # request as it is) nor lose the record: fail closed on the way in, pass the
                    # upstream's answer through on the way out, and record what is known.
                    log.exception(
                        "exchange.failed", request_id=ex.request_id, phase=phase, error=type(exc).__name__
                    )
                    self._metrics.inc("spendgate_exchange_failures_total", phase=str(phase))
                    resp = msg.failed(phase, ex.fail(phase))
                yield resp
                if ex.finished:
                    # Nothing more is needed from this request: closing frees Envoy's side too.
                    return
        finally:
            ex.abandon()

    async def _answer(
        self, ex: Exchange, req: pb.ProcessingRequest, phase: str | None
    ) -> pb.ProcessingResponse:
        """The reply to one phase."""
        if phase == "response_body":
            body = req.response_body
            return msg.response_body(ex.on_response_body(body.body, body.end_of_stream))
        if phase == "request_headers":
            headers = req.request_headers
            reply = await self._admitted(
                ex, ex.on_request_headers(msg.header_map(headers), headers.end_of_stream)
            )
            if reply.immediate_status == 401:  # refused before any record exists
                self._metrics.inc("spendgate_unauthenticated_total")
            return msg.request_headers(reply)
        if phase == "request_body":
            body = req.request_body.body
            if len(body) > _INLINE_BODY_BYTES:
                # Decoding and counting a large body takes milliseconds: not on the event loop,
                # where it would stall every other request's phases.
                outcome = await asyncio.to_thread(ex.on_request_body, body)
            else:
                outcome = ex.on_request_body(body)
            return msg.request_body(await self._admitted(ex, outcome))
        if phase == "response_headers":
            headers = req.response_headers
            return msg.response_headers(
                ex.on_response_headers(msg.header_map(headers), headers.end_of_stream)
            )
        # Trailers are configured off; if one arrives anyway it must still be answered.
        if phase not in ("request_trailers", "response_trailers"):
            log.warning("ext_proc.unexpected_phase", phase=phase)
        return msg.unchanged(phase)

    async def _admitted(self, ex: Exchange, outcome: Reply | Admission) -> Reply:
        """The reply to send: an Admission is first put to the gatekeeper."""
        if isinstance(outcome, Admission):
            return ex.apply(await self._gatekeeper.admit(outcome))
        return outcome

    async def _upstream(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest]
    ) -> AsyncIterator[pb.ProcessingResponse]:
        """One failover attempt: the credential for the cluster Envoy picked, then who answered."""
        attempt = self._new_attempt()
        async for req in request_iterator:
            phase = req.WhichOneof("request")
            if phase == "request_headers":
                attrs = req.attributes.get("envoy.filters.http.ext_proc")
                meta = (
                    attrs.fields[HOST_METADATA].string_value
                    if attrs and HOST_METADATA in attrs.fields
                    else ""
                )
                reply = attempt.on_request_headers(msg.header_map(req.request_headers), meta)
                yield msg.request_headers(reply)
                if reply.immediate_status is not None:
                    return
            elif phase == "response_headers":
                yield msg.response_headers(attempt.on_response_headers())
                return
            else:
                yield msg.unchanged(phase)
