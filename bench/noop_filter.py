"""The floor: an ext_proc server that answers the same phases as Spendgate and does nothing else.

It routes to the bench upstream and asks for the same bodies (buffered request, buffered JSON or
streamed SSE response), so Envoy plus this process costs what the gRPC round trips cost by
themselves. The distance from this floor to Spendgate is what Spendgate's own code costs.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from extproc.exchange import UPSTREAM_HEADER

_M = processing_mode_pb2.ProcessingMode


def _mode(request_body: int, response_body: int) -> processing_mode_pb2.ProcessingMode:
    return _M(
        request_header_mode=_M.SEND,
        response_header_mode=_M.SEND,
        request_body_mode=request_body,
        response_body_mode=response_body,
        request_trailer_mode=_M.SKIP,
        response_trailer_mode=_M.SKIP,
    )


class NoopFilter(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Constant replies; the only decision is buffered JSON versus streamed SSE."""

    def __init__(self, cluster: str) -> None:
        route = base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=UPSTREAM_HEADER, raw_value=cluster.encode())
        )
        self._request_headers = pb.ProcessingResponse(
            request_headers=pb.HeadersResponse(
                response=pb.CommonResponse(
                    header_mutation=pb.HeaderMutation(set_headers=[route]), clear_route_cache=True
                )
            ),
            mode_override=_mode(_M.BUFFERED, _M.NONE),
        )
        self._request_body = pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse()))
        self._json = pb.ProcessingResponse(
            response_headers=pb.HeadersResponse(response=pb.CommonResponse()),
            mode_override=_mode(_M.NONE, _M.BUFFERED),
        )
        self._sse = pb.ProcessingResponse(
            response_headers=pb.HeadersResponse(response=pb.CommonResponse()),
            mode_override=_mode(_M.NONE, _M.STREAMED),
        )
        self._response_body = pb.ProcessingResponse(
            response_body=pb.BodyResponse(response=pb.CommonResponse())
        )

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        """Answer each phase with its constant."""
        async for req in request_iterator:
            phase = req.WhichOneof("request")
            if phase == "request_headers":
                yield self._request_headers
            elif phase == "request_body":
                yield self._request_body
            elif phase == "response_headers":
                sse = any(
                    h.key == "content-type" and b"event-stream" in h.raw_value
                    for h in req.response_headers.headers.headers
                )
                yield self._sse if sse else self._json
            else:
                yield self._response_body
                if req.response_body.end_of_stream:
                    return


async def _serve(address: str, cluster: str) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(NoopFilter(cluster), server)
    # Envoy health-checks the ext_proc cluster and sends nothing to a host that does not answer.
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
    server.add_insecure_port(address)
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    import uvloop

    uvloop.run(_serve(sys.argv[1], sys.argv[2]))
