"""The upstream half of failover: per attempt, send the credential of the cluster Envoy picked.

Envoy routes a key with a fallback chain to an aggregate cluster and retries the next member
on connect failure, 5xx or 429. An ext_proc filter on that aggregate cluster runs once per
attempt, after Envoy chose the host: it swaps in the credential whose cluster that host belongs
to, and tags the response with the cluster that answered, for the usage record.
"""

from __future__ import annotations

import re
import uuid

from extproc.exchange import CREDENTIAL_HEADERS, FAILOVER_HEADER, SERVED_BY_HEADER, Reply
from extproc.keytable import KeyTable
from extproc.providers import PROVIDERS

# The attribute arrives as protobuf text: filter_metadata { key: "spendgate" value { fields {
# key: "cluster" value { string_value: "<name>" } } } }
_CLUSTER = re.compile(r'key: "cluster" value \{ string_value: "([^"]+)" \}')
HOST_METADATA = "xds.upstream_host_metadata"
# gRPC metadata the upstream (per attempt) filter sends, so the servicer tells its streams apart.
PHASE_METADATA = "x-spendgate-phase"


class UpstreamAttempt:
    """One attempt of a failover request, as seen by the upstream filter."""

    def __init__(self, keys: KeyTable) -> None:
        self._keys = keys
        self._cluster: str | None = None

    def on_request_headers(self, headers: dict[str, str], host_metadata: str) -> Reply:
        """Put the chosen cluster's credential on the request; refuse if there is none."""
        m = _CLUSTER.search(host_metadata)
        try:
            chain = self._keys.chain(uuid.UUID(headers.get(FAILOVER_HEADER, "")))
        except ValueError:
            chain = ()
        cred = next((c for c in chain if m and c.upstream.cluster == m.group(1)), None)
        if cred is None:
            # Fail closed: never let an attempt go out with another upstream's credential.
            return Reply(
                immediate_status=503, body=b'{"error":{"message":"no credential for the failover upstream"}}'
            )
        self._cluster = cred.upstream.cluster
        reply = Reply(
            remove_headers=[h for h in (*CREDENTIAL_HEADERS, FAILOVER_HEADER) if h in headers],
            set_headers=list(PROVIDERS[cred.provider].auth_headers(cred.secret)),
        )
        primary = chain[0].upstream.path_prefix
        path = headers.get(":path", "/")
        if cred.upstream.path_prefix != primary and path.startswith(primary):
            reply.set_headers.append((":path", cred.upstream.path_prefix + path[len(primary) :]))
        return reply

    def on_response_headers(self) -> Reply:
        """Tell the downstream filter which cluster answered."""
        return Reply(set_headers=[(SERVED_BY_HEADER, self._cluster or "")])
