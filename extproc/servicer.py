"""The ext_proc gRPC servicer: it only dispatches Envoy's phases to an Exchange."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc
import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc import envoy_messages as msg
from extproc.budget_store import BudgetStore, BudgetUnavailable
from extproc.exchange import Exchange, Reply
from extproc.policy.budgets import Admission

log = structlog.get_logger("spendgate.servicer")


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """One gRPC stream per HTTP request; one Exchange per stream."""

    def __init__(self, new_exchange: Callable[[], Exchange], budgets: BudgetStore | None = None) -> None:
        self._new_exchange = new_exchange
        self._budgets = budgets

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        """Answer every phase Envoy sends; finalise the request however the stream ends."""
        ex = self._new_exchange()
        try:
            async for req in request_iterator:
                phase = req.WhichOneof("request")
                if phase == "response_body":
                    body = req.response_body
                    yield msg.response_body(ex.on_response_body(body.body, body.end_of_stream))
                elif phase == "request_headers":
                    headers = req.request_headers
                    yield msg.request_headers(
                        ex.on_request_headers(msg.header_map(headers), headers.end_of_stream)
                    )
                elif phase == "request_body":
                    outcome = ex.on_request_body(req.request_body.body)
                    if isinstance(outcome, Admission):
                        outcome = await self._admit(ex, outcome)
                    yield msg.request_body(outcome)
                elif phase == "response_headers":
                    headers = req.response_headers
                    yield msg.response_headers(
                        ex.on_response_headers(msg.header_map(headers), headers.end_of_stream)
                    )
                else:
                    # Trailers are configured off; if one arrives anyway it must still be answered.
                    yield _continue(phase)
                if ex.finished:
                    # Nothing more is needed from this request: closing frees Envoy's side too.
                    return
        finally:
            ex.abandon()

    async def _admit(self, ex: Exchange, admission: Admission) -> Reply:
        """The one await on the request path: reserving budget in Postgres."""
        if self._budgets is None:
            return ex.on_budget_unavailable()
        try:
            refusal = await self._budgets.reserve(admission)
        except BudgetUnavailable as exc:
            log.warning("budget.unavailable", request_id=ex.request_id, error=str(exc)[:200])
            return ex.on_budget_unavailable()
        return ex.on_admitted(refusal)


def _continue(phase: str | None) -> pb.ProcessingResponse:
    if phase == "request_trailers":
        return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
    if phase == "response_trailers":
        return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
    log.warning("ext_proc.unexpected_phase", phase=phase)
    return pb.ProcessingResponse(request_headers=pb.HeadersResponse())
