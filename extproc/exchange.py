"""One proxied request, phase by phase, as plain data: the decisions without the gRPC.

The servicer turns Envoy's messages into calls on an Exchange and its Replies back into
protobuf. Every path through an Exchange ends in exactly one call to `finalize`, which builds
the usage record.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal, Protocol
from urllib.parse import parse_qsl, urlencode

import structlog

from extproc import tokens, wrapped_keys
from extproc.keytable import KeyEntry, KeyTable
from extproc.paths import UnsafePath, canonical_path
from extproc.plausibility import DEFAULT_CONTEXT_WINDOW, bounds_for, draws_on_upstream_context, within
from extproc.policy.budgets import Admission, Hold, Settlement, ceiling
from extproc.policy.evaluate import Binding, Decision, canonical_model, decide, model_name_problem
from extproc.policy.limits import Charge, window
from extproc.policy.loader import PolicySet
from extproc.providers import PROVIDERS, guess_from_request
from extproc.providers.base import (
    PASSTHROUGH,
    BadRequest,
    Change,
    ParsedRequest,
    Provider,
    StreamAccountant,
    count_prompt,
    usage_from_body,
)
from extproc.usage import Usage, UsageRecord
from extproc.verdict import Granted, OverBudget, Throttled, Unavailable, Verdict

log = structlog.get_logger("spendgate.exchange")

UPSTREAM_HEADER = "x-spendgate-upstream"
REQUEST_ID_HEADER = "x-spendgate-request-id"
TAGS_HEADER = "x-spendgate-tags"
# Between the downstream and the upstream (per attempt) filter when a key has failover: which
# primary credential's chain to pick from, and which cluster finally answered.
FAILOVER_HEADER = "x-spendgate-failover"
SERVED_BY_HEADER = "x-spendgate-served-by"
# Every place a client may put a credential. All are cleared before the request goes up, so a
# wrapped key can never reach a provider whichever header it came in.
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "api-key", "proxy-authorization")
# Query parameters any provider accepts a credential in (compared lower case): a wrapped key in
# any of them is dropped before the request goes up, whichever one the client chose.
CREDENTIAL_QUERY = frozenset({"key", "api_key", "api-key", "apikey", "access_token", "x-goog-api-key"})
_STRIP_ALWAYS = (*CREDENTIAL_HEADERS, TAGS_HEADER, "accept-encoding")
# The only headers an Exchange reads; the servicer decodes nothing else.
HEADERS_READ = frozenset(
    {
        *_STRIP_ALWAYS,
        ":method",
        ":path",
        ":status",
        "content-type",
        "content-length",
        "content-encoding",
        "anthropic-version",
        SERVED_BY_HEADER,
        FAILOVER_HEADER,
    }
)

BodyMode = Literal["BUFFERED", "STREAMED"]
# A compressed response is accounted on at most this much inflated content.
MAX_INFLATED_BYTES = 16 * 1024 * 1024
# Flags that mean the figures on the record were not all read from the provider.
_ESTIMATING_FLAGS = frozenset({"internal_error", "body_too_large_to_account"})


@dataclass
class Reply:
    """The answer to one phase: continue (maybe mutated), or stop with an immediate response."""

    set_headers: list[tuple[str, str]] = field(default_factory=list)
    remove_headers: list[str] = field(default_factory=list)
    body: bytes | None = None
    clear_route_cache: bool = False
    request_body_mode: BodyMode | None = None
    response_body_mode: BodyMode | None = None
    immediate_status: int | None = None


@dataclass
class Limits:
    """Knobs that bound what one request may cost the proxy."""

    max_request_body_bytes: int = 8 * 1024 * 1024
    max_tags: int = 16


class PolicySource(Protocol):
    """Where an Exchange reads the policy set in force (a PolicyStore, or a fixed set in tests)."""

    @property
    def current(self) -> PolicySet:
        """The prices and policies to apply to a request starting now."""


def _presented_credentials(headers: dict[str, str], query: list[tuple[str, str]]) -> list[str]:
    found = []
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        found.append(auth[7:].strip())
    for name in ("x-api-key", "x-goog-api-key", "api-key"):
        if name in headers:
            found.append(headers[name].strip())
    found.extend(v for k, v in query if k.strip().lower() in CREDENTIAL_QUERY)
    return found


def parse_tags(raw: str, limit: int) -> dict[str, str]:
    """`x-spendgate-tags`: a JSON object or `k=v,k2=v2`; at most `limit` string pairs."""
    tags: dict[str, str] = {}
    raw = raw.strip()
    if raw.startswith("{"):
        try:
            doc = json.loads(raw)
        except ValueError:
            return {}
        items = doc.items() if isinstance(doc, dict) else []
        pairs = [(str(k), v if isinstance(v, str) else json.dumps(v)) for k, v in items]
    else:
        pairs = [tuple(p.split("=", 1)) for p in raw.split(",") if "=" in p]  # type: ignore[misc]
    for k, v in pairs[:limit]:
        k, v = k.strip()[:64], v.strip()[:256]
        if k:
            tags[k] = v
    return tags


class Exchange:
    """State of one request through the proxy."""

    def __init__(
        self,
        keys: KeyTable,
        policies: PolicySource,
        emit: Callable[[UsageRecord], None],
        limits: Limits,
        settle: Callable[[Settlement], None] = lambda _: None,
    ) -> None:
        self._keys = keys
        self._settle = settle
        # One consistent set per request, even if a reload lands while it is in flight.
        self._set = policies.current
        self._emit = emit
        self._limits = limits
        self.request_id = str(uuid.uuid4())
        self._t0 = time.monotonic()
        self._ts = dt.datetime.now(dt.UTC)
        self._provider: Provider | None = None
        self._entry: KeyEntry | None = None
        self._api = PASSTHROUGH
        self._path = ""
        self._query: list[tuple[str, str]] = []
        self._model_routed: str | None = None
        self._input_tokens: int | None = None
        self._served_by: str | None = None
        self._request: ParsedRequest | None = None
        self._status = 0
        self._ttft_ms: int | None = None
        self._stream: StreamAccountant | None = None
        self._json_body: list[bytes] = []
        self._inflate: zlib._Decompress | None = None
        self._inflated = 0  # bytes inflated so far; bounded so a gzip bomb can't stall the loop
        self._flags: set[str] = set()  # see UsageRecord.flags
        self._broken = False  # accounting failed mid-response: pass the rest through untouched
        self._body_bytes = 0
        self._held_back = False  # the response body is buffered: the client has seen nothing yet
        self._client_status: int | None = None  # what the client got, when not the upstream's status
        self._routing: list[tuple[str, str]] = []  # credential and route, sent with the body reply
        self._max_out: int | None = None  # per completion, after policy clamps
        self._tags: dict[str, str] = {}
        self._rewrite_error = False
        self._first_chunk_seen = False
        self._admission: Admission | None = None  # granted or pending; finalize settles it
        self._budget_held = False
        self._pending: Reply | None = None
        self.finished = False

    # -- request headers ---------------------------------------------------------------
    def on_request_headers(self, headers: dict[str, str], end_of_stream: bool) -> Reply | Admission:
        """Authenticate, swap the credential, pick the upstream, ask for the body if needed.

        An Admission (a pass-through request under a rate limit) asks the gatekeeper first.
        """
        method = headers.get(":method", "")
        raw_path = headers.get(":path", "/")
        path, _, qs = raw_path.partition("?")
        query = parse_qsl(qs, keep_blank_values=True) if qs else []
        presented = _presented_credentials(headers, query)
        now = dt.datetime.now(dt.UTC)
        entry = next((e for e in (self._keys.lookup(p, now) for p in presented) if e is not None), None)
        if entry is None:
            provider = guess_from_request(path, set(headers))
            self._provider = provider
            reason = "missing" if not presented else "unknown, revoked or expired"
            log.info(
                "request.rejected",
                request_id=self.request_id,
                status=401,
                reason=f"wrapped key {reason}",
                key_prefix=next((wrapped_keys.visible_prefix(p) for p in presented), None),
            )
            self.finished = True  # no key, no record: unauthenticated traffic is not billed to anyone
            msg = "Incorrect API key provided. Spendgate needs a valid wrapped key (sg-...)."
            return self.reject(401, msg, record=False)

        self._entry = entry
        provider = PROVIDERS[entry.provider]
        self._provider = provider
        self._path = path
        if TAGS_HEADER in headers:
            self._tags = parse_tags(headers[TAGS_HEADER], self._limits.max_tags)
        try:
            # Accounting, policy and the upstream all see this one path, never the raw one.
            self._path = canonical_path(path)
        except UnsafePath as exc:
            return self.reject(400, f"invalid request path: {exc}")
        self._api = provider.api_for(method, self._path) or PASSTHROUGH
        if self._api == PASSTHROUGH:
            caller = guess_from_request(self._path, set(headers))
            if caller is not provider and caller.api_for(method, self._path) is not None:
                # One provider's SDK with a key for another's credential: say so, in the format
                # the calling SDK reads, rather than call its API unmetered.
                return self.reject(
                    403,
                    f"this wrapped key is for a {provider.name} credential, but {method} {self._path} is "
                    f"{caller.name}'s API: use a key issued for a {caller.name} credential",
                    error_format=caller,
                )

        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > self._limits.max_request_body_bytes:
            return self.reject(413, f"request body exceeds {self._limits.max_request_body_bytes} bytes")
        removed = [h for h in _STRIP_ALWAYS if h in headers]
        routing = [*provider.auth_headers(entry.secret), (UPSTREAM_HEADER, entry.route)]
        if entry.chain:  # overwrites whatever a client sent: only this key's own chain may be used
            routing.append((FAILOVER_HEADER, str(entry.credential_id)))
        elif FAILOVER_HEADER in headers:
            removed.append(FAILOVER_HEADER)
        self._query = [(k, v) for k, v in query if k.strip().lower() not in CREDENTIAL_QUERY]
        new_path = self._upstream_path(self._path)
        path_change = [(":path", new_path)] if new_path != raw_path else []
        path_change.append((REQUEST_ID_HEADER, self.request_id))  # for Envoy's own error replies to copy
        if self._api == PASSTHROUGH:
            reply = Reply(remove_headers=removed, set_headers=routing + path_change, clear_route_cache=True)
            return self._admit_passthrough(entry, method, self._path, reply, now)
        if end_of_stream:
            # No body phase will follow: forwarding it would let an accounted API through unpriced.
            return self.reject(400, "request body is empty; expected a JSON object")
        # The real credential and the route wait for the body reply: should the filter fail
        # after this answer (where fail-open is configured, Envoy then goes on without it), the
        # request has neither key nor route and meets the catch-all 503, never an unchecked body.
        self._routing = routing
        return Reply(
            remove_headers=removed,
            set_headers=path_change,
            clear_route_cache=True,
            request_body_mode="BUFFERED",
        )

    def _admit_passthrough(
        self, entry: KeyEntry, method: str, path: str, reply: Reply, now: dt.datetime
    ) -> Reply | Admission:
        """Policies on a request Spendgate does not account: budgets refuse what costs money they
        cannot see, and every request counts against requests-per-minute limits."""
        assert self._provider is not None
        binding = self._set.binding(entry.subject)
        if not self._provider.is_free(method, path):
            holds = sorted(binding.holds(now), key=lambda h: h.shadow)  # an enforced budget first
            if holds:
                reason = (
                    f"{method} {path} is not metered by Spendgate, so a key under budget policy "
                    f"'{holds[0].policy}' may not use it"
                )
                if not holds[0].shadow:
                    return self.reject(403, reason)
                log.info("policy.shadow_rejection", request_id=self.request_id, status=403, reason=reason)
            if not binding.passes_through(method, path):
                # Whatever Spendgate cannot account is refused unless a policy names it: an
                # unknown path may start paid work upstream that no record would ever show.
                return self.reject(
                    403,
                    f"{method} {path} is not an API Spendgate meters; a policy's passthrough list "
                    "must name it before it is forwarded",
                )
        charges = [c for c in binding.charges(0) if c.kind == "requests"]
        if not charges:
            return reply
        return self._await_admission(reply, (), Decimal(0), tuple(charges), now)

    def _upstream_path(self, path: str) -> str:
        assert self._entry is not None
        return self._entry.upstream.path_prefix + path + ("?" + urlencode(self._query) if self._query else "")

    # -- request body ------------------------------------------------------------------
    def on_request_body(self, body: bytes) -> Reply | Admission:
        """Parse the request and apply policies; an Admission asks the budget store first."""
        assert self._provider is not None
        if len(body) > self._limits.max_request_body_bytes:
            # A chunked upload carries no content-length for the header check to catch.
            return self.reject(413, f"request body exceeds {self._limits.max_request_body_bytes} bytes")
        self._body_bytes = len(body)
        try:
            self._request = self._provider.parse_request(self._api, self._path, body)
        except BadRequest as exc:
            return self.reject(400, str(exc))
        problem = model_name_problem(self._request.model) if self._request.model else None
        if problem is not None:
            return self.reject(400, f"invalid model name: it {problem}")
        assert self._entry is not None
        binding = self._set.binding(self._entry.subject)
        reply, decision = self._apply_policies(binding, self._request)
        if reply.immediate_status is not None or decision is None:
            return reply
        reply.set_headers[:0] = self._routing
        reply.clear_route_cache = True
        if self._request.rewritten is not None:
            reply.body = self._request.rewritten
            reply.set_headers.append(("content-length", str(len(self._request.rewritten))))
        if binding.budgets or binding.rate_limits:
            return self._admission_for(self._request, binding, decision, reply)
        return reply

    def _admission_for(
        self, req: ParsedRequest, binding: Binding, decision: Decision, reply: Reply
    ) -> Reply | Admission:
        """Rate-limit charges and the worst-case cost to reserve on every budget covering this key."""
        now = dt.datetime.now(dt.UTC)
        holds = binding.holds(now)
        if not holds and not binding.rate_limits:
            return reply
        price = self._set.prices.lookup(canonical_model(decision.model))
        input_tokens = self._counted_input(req) + req.extra_input_tokens
        if draws_on_upstream_context(req.body):
            # A stored conversation or a server-run tool bills input the body does not show.
            window = price.context_window if price and price.context_window else DEFAULT_CONTEXT_WINDOW
            input_tokens = max(input_tokens, window)
        max_out = self._max_out
        if (
            price is not None
            and price.max_output_tokens
            and max_out is not None
            and max_out > price.max_output_tokens
        ):
            return self.reject(
                400,
                f"max_tokens is too large: {max_out}. Model '{decision.model}' supports at most "
                f"{price.max_output_tokens} output tokens",
            )
        per_completion = max_out if max_out is not None else (price.max_output_tokens if price else 0)
        # Every completion the request asks for (n, best_of, candidateCount) may run to the ceiling.
        reserved_out = per_completion * req.multiplier
        charges = binding.charges(input_tokens + reserved_out)
        amount = Decimal(0)
        if holds:
            cost = ceiling(price, input_tokens, reserved_out) if price and per_completion else None
            if cost is None:
                return self.reject(
                    403,
                    f"model '{decision.model}' has no price or output limit in the price table, so a "
                    "budgeted key may not use it",
                )
            amount = cost
        return self._await_admission(reply, holds, amount, charges, now)

    @staticmethod
    def _output_ceiling(req: ParsedRequest, decision: Decision) -> int | None:
        """The tightest output ceiling per completion: the request's own, or a policy clamp."""
        ceilings = [m for m in (req.max_tokens, decision.max_tokens) if m is not None]
        return min(ceilings) if ceilings else None

    def _await_admission(
        self,
        reply: Reply,
        holds: tuple[Hold, ...],
        amount: Decimal,
        charges: tuple[Charge, ...],
        now: dt.datetime,
    ) -> Admission:
        """What the gatekeeper must grant; `reply` is sent once it has (see `apply`)."""
        win, reset = window(now)
        self._admission = Admission(self.request_id, holds, amount, charges, win, reset)
        self._pending = reply
        return self._admission

    def _counted_input(self, req: ParsedRequest) -> int:
        """tiktoken's count of the request's input, made at most once (routing and admission share it)."""
        if self._input_tokens is None:
            assert self._provider is not None
            self._input_tokens = count_prompt(self._provider, self._api, req.body)
        return self._input_tokens

    def _apply_policies(self, binding: Binding, req: ParsedRequest) -> tuple[Reply, Decision | None]:
        """Model rules, routing and transforms of the policies bound to this key."""
        assert self._provider is not None
        decision = decide(
            binding,
            req.model,
            input_tokens=lambda: self._counted_input(req),
            draw=random.random(),
        )
        for reason in decision.shadow:
            log.info("policy.shadow_rejection", request_id=self.request_id, status=403, reason=reason)
        if decision.reject is not None:
            return self.reject(403, decision.reject), None
        self._tags = {**decision.tags, **self._tags}  # the request's own tags win over defaults
        self._model_routed = decision.model
        self._max_out = self._output_ceiling(req, decision)
        change = Change(
            model=decision.model if decision.model != req.model else None,
            max_tokens=decision.max_tokens,
            system_prompt=decision.system_prompt,
        )
        reply = Reply()
        if change == Change() or not isinstance(req.body, dict):
            return reply, decision
        changed, new_path = self._provider.transform(self._api, req.body, self._path, change)
        if changed:
            req.rewritten = json.dumps(req.body, separators=(",", ":")).encode()
        if new_path is not None:
            reply.set_headers.append((":path", self._upstream_path(new_path)))
        return reply, decision

    # -- response headers --------------------------------------------------------------
    def on_response_headers(self, headers: dict[str, str], end_of_stream: bool) -> Reply:
        """Note the status; ask for the body only when it carries usage or must be rewritten."""
        self._status = int(headers.get(":status", "0") or 0)
        self._ttft_ms = self._elapsed_ms()
        reply = Reply(set_headers=[(REQUEST_ID_HEADER, self.request_id)])
        if SERVED_BY_HEADER in headers:
            self._served_by = headers[SERVED_BY_HEADER]
            reply.remove_headers.append(SERVED_BY_HEADER)
        content_type = headers.get("content-type", "")
        if self._status >= 400 and "json" not in content_type and not end_of_stream:
            # Envoy's own replies (connect failure, timeout, overflow, 413 on a body past its
            # buffer) are plain text; an SDK expects its provider's JSON error, so the body is
            # replaced once it is complete.
            self._rewrite_error = True
            reply.response_body_mode = "BUFFERED"
            return reply
        if end_of_stream or self._api == PASSTHROUGH or self._status >= 300 or self._request is None:
            self.finalize("complete" if self._status < 400 else "upstream_error")
            return reply
        assert self._provider is not None
        encoding = headers.get("content-encoding", "")
        if encoding in ("gzip", "deflate"):
            # accept-encoding is stripped on the way up; this covers upstreams that compress anyway.
            self._inflate = zlib.decompressobj(47 if encoding == "gzip" else 15)
        if "text/event-stream" in content_type:
            self._stream = self._provider.stream_accountant(self._api, self._request)
            reply.response_body_mode = "STREAMED"
            if self._request.strip_usage and "content-length" in headers:
                # The stream will be rewritten, so the upstream's length no longer holds; Envoy
                # fails a mutated streamed body that disagrees with a content-length it sent on.
                reply.remove_headers.append("content-length")
        else:
            reply.response_body_mode = "BUFFERED"
            self._held_back = True
        return reply

    # -- response body -----------------------------------------------------------------
    def on_response_body(self, chunk: bytes, end_of_stream: bool) -> Reply | None:
        """Account one body chunk; return a Reply only when the client must see something else."""
        if self._broken:
            if end_of_stream:
                self.finalize("complete")
            return None
        if self._rewrite_error:
            return self._rewritten_error(chunk)
        data = self._inflated_bytes(chunk) if self._inflate is not None else chunk
        replacement = None
        if self._stream is not None:
            if not self._first_chunk_seen:
                # For a stream, the first token is the first body chunk, not the headers.
                self._first_chunk_seen = True
                self._ttft_ms = self._elapsed_ms()
            replacement = self._stream.feed(data, end_of_stream)
            if replacement is not None and self._inflate is not None:
                # The client was told the body is compressed; a rewritten body is not.
                replacement = None
        else:
            self._json_body.append(data)
        if end_of_stream:
            self.finalize(self._stream_outcome())
        return Reply(body=replacement) if replacement is not None else None

    def _stream_outcome(self) -> str:
        """A response that ended: an error event inside a 200 stream is still an upstream error."""
        return "upstream_error" if self._stream is not None and self._stream.failed else "complete"

    def _inflated_bytes(self, chunk: bytes) -> bytes:
        """A compressed chunk's content, up to MAX_INFLATED_BYTES for the whole response."""
        assert self._inflate is not None
        room = MAX_INFLATED_BYTES - self._inflated
        if room <= 0:
            return b""
        data = self._inflate.decompress(chunk, room)
        self._inflated += len(data)
        if self._inflate.unconsumed_tail:
            # Past the bound the rest is not read (the client still gets every byte); the
            # record is estimated from what was.
            self._inflated = MAX_INFLATED_BYTES
            self._flags.add("body_too_large_to_account")
        return data

    def _rewritten_error(self, body: bytes) -> Reply:
        assert self._provider is not None
        detail = body.decode("utf-8", "replace").strip()[:300] or "no response from the provider"
        doc = self._provider.error_body(self._status, f"upstream error: {detail}")
        self.finalize("upstream_error")
        return Reply(
            body=doc, set_headers=[("content-type", "application/json"), ("content-length", str(len(doc)))]
        )

    # -- end -----------------------------------------------------------------------------
    def abandon(self) -> None:
        """The stream to Envoy ended early: the client hung up or the upstream broke."""
        if self.finished:
            return
        if self._stream is not None and self._stream.ended:
            self.finalize(self._stream_outcome())
            return
        if self._held_back and self._status < 300:
            # A buffered answer that never ended never reached the client: Envoy answered it
            # with a 502 of its own, so the record says what the client saw. The provider still
            # ran (and bills) the request: its tokens are estimated as for any cut answer.
            self._client_status = 502
        self.finalize("client_disconnect" if self._status == 0 else "incomplete")

    def reject(
        self,
        status: int,
        message: str,
        *,
        record: bool = True,
        headers: tuple[tuple[str, str], ...] = (),
        error_format: Provider | None = None,
    ) -> Reply:
        """Stop the request with an error in the calling provider's own format (the key's
        provider's unless `error_format` names the one the caller speaks)."""
        assert self._provider is not None
        self._status = status
        if record:
            log.info("request.rejected", request_id=self.request_id, status=status, reason=message)
            self.finalize("rejected")
        return Reply(
            immediate_status=status,
            body=(error_format or self._provider).error_body(status, message),
            set_headers=[
                ("content-type", "application/json"),
                (REQUEST_ID_HEADER, self.request_id),
                *headers,
            ],
        )

    # -- budgets -------------------------------------------------------------------------
    def apply(self, verdict: Verdict) -> Reply:
        """The reply a gatekeeper's verdict on this request's Admission calls for."""
        assert self._admission is not None and self._pending is not None
        if isinstance(verdict, Granted):
            self._budget_held = verdict.budget_held
            return self._pending
        if isinstance(verdict, Throttled):
            self._admission = None  # nothing was charged, nothing reserved: nothing to settle
            return self.reject(429, verdict.throttle.message(), headers=verdict.throttle.headers())
        if isinstance(verdict, OverBudget):
            refusal = verdict.refusal
            retry = max(1, int((refusal.hold.period_end - dt.datetime.now(dt.UTC)).total_seconds()))
            return self.reject(
                429, refusal.message(self._admission.amount), headers=(("retry-after", str(retry)),)
            )
        assert isinstance(verdict, Unavailable)
        return self.reject(503, "budget store unavailable; the request was not forwarded. Retry shortly.")

    def fail(self, phase: str | None) -> Reply | None:
        """A defect surfaced while handling `phase`: refuse a request that has not gone up yet;
        let a response already on its way pass untouched and record it as estimated."""
        self._flags.add("internal_error")
        if phase in ("request_headers", "request_body"):
            if self._provider is None:
                self._provider = PROVIDERS["openai"]
            self._admission = None  # nothing was reserved for a request that never got that far
            return self.reject(
                500,
                "Spendgate could not process this request, so it was not forwarded",
                record=not self.finished,
            )
        self._broken = True
        self._stream = None
        self._json_body = []
        self._rewrite_error = False
        if phase == "response_headers":
            self.finalize("complete" if self._status < 400 else "upstream_error")
        return None

    def finalize(self, outcome: str) -> None:
        """Build and emit the one usage record of this request; never raises."""
        if self.finished:
            return
        self.finished = True
        entry, provider = self._entry, self._provider
        if entry is None or provider is None:
            return
        try:
            usage, model_used, estimated = self._settle_usage(outcome)
        except Exception as exc:  # whatever the upstream sent, the request is still recorded
            log.exception("usage.unreadable", request_id=self.request_id, error=type(exc).__name__)
            self._flags.add("internal_error")
            usage, model_used, estimated = Usage(), None, True
        if self._request is not None and usage != Usage():
            usage = self._plausible(usage)
        prices = self._set.prices
        model = model_used or self._model_routed or (self._request.model if self._request else None)
        try:
            cost = prices.cost(canonical_model(model), usage)
        except ArithmeticError:
            cost = None
            self._flags.add("cost_unavailable")
        record = UsageRecord(
            request_id=self.request_id,
            ts=self._ts,
            provider=provider.name,
            api=self._api,
            key_id=entry.key_id,
            team=entry.team,
            project=entry.project,
            model_requested=self._request.model if self._request else None,
            model_used=model,
            upstream=self._served_by or entry.upstream.cluster,
            usage=usage,
            cost_usd=cost,
            price_version=prices.version,
            latency_ms=self._elapsed_ms(),
            ttft_ms=self._ttft_ms,
            status=self._client_status or self._status or 499,
            outcome=outcome,
            stream=bool(self._request and self._request.stream),
            estimated=estimated or bool(self._flags & _ESTIMATING_FLAGS),
            tags=self._tags,
            flags=tuple(sorted(self._flags)),
        )
        self._emit(record)
        if self._admission is not None:
            u = record.usage
            tokens_used = u.input_tokens + u.output_tokens
            self._settle(
                Settlement(self._admission, record.cost_usd or Decimal(0), tokens_used, self._budget_held)
            )

    def _plausible(self, usage: Usage) -> Usage:
        """Reported usage clamped to what the request could have produced (see plausibility)."""
        req = self._request
        assert req is not None
        price = self._set.prices.lookup(canonical_model(self._model_routed or req.model))
        limits = [m for m in (self._max_out, price.max_output_tokens if price else None) if m]
        bounds = bounds_for(
            req.body, self._body_bytes, req.extra_input_tokens, req.multiplier, min(limits, default=None)
        )
        clamped, changed = within(usage, bounds)
        if changed:
            self._flags.add("implausible_usage")
            log.warning(
                "usage.implausible",
                request_id=self.request_id,
                reported_input=usage.input_tokens,
                reported_output=usage.output_tokens,
                bound_input=bounds.input_tokens,
                bound_output=bounds.output_tokens,
            )
        return clamped

    def _settle_usage(self, outcome: str) -> tuple[Usage, str | None, bool]:
        """Provider-reported usage when there is some; a tiktoken estimate where it is missing."""
        assert self._provider is not None
        req = self._request
        if req is None or outcome == "rejected" or (outcome != "client_disconnect" and self._status >= 300):
            return Usage(), None, False
        reported: Usage | None = None
        model: str | None = None
        text = ""
        unseen_output = 0  # output seen but not kept as text, as a token estimate
        lossy = False
        anomalies: tuple[str, ...] = ()
        if self._stream is not None:
            result = self._stream.finish()
            reported, model, text = result.usage, result.model, result.text
            unseen_output, lossy = result.extra_output_tokens, result.lossy
            anomalies = result.anomalies
        elif self._json_body:
            answer = usage_from_body(self._provider, self._api, b"".join(self._json_body))
            reported, model, anomalies = answer.usage, answer.model, answer.anomalies
        self._note_anomalies(anomalies)
        # A stream can end cleanly yet without its final usage event (an error event mid-way):
        # text that was delivered but not counted means the report is not the whole story. A
        # figure the reader had to replace (negative, non-finite) is counted again too.
        trusted = not lossy and not anomalies and not (self._flags & _ESTIMATING_FLAGS)
        if (
            outcome == "complete"
            and trusted
            and reported is not None
            and not (reported.output_tokens == 0 and text)
        ):
            return reported, model, False
        # Cut short, or the provider never said: count what we can, keep what it did report.
        base = reported or Usage()
        input_tokens = base.input_tokens or self._counted_input(req)
        counted_output = tokens.count(text) + unseen_output
        # Past a part it could not parse, a reported figure may be an early partial one.
        output_tokens = (
            max(base.output_tokens, counted_output) if lossy else base.output_tokens or counted_output
        )
        estimated = Usage(
            input_tokens=input_tokens,
            cached_input_tokens=base.cached_input_tokens,
            cache_write_tokens=base.cache_write_tokens,
            cache_write_1h_tokens=base.cache_write_1h_tokens,
            output_tokens=output_tokens,
            reasoning_tokens=base.reasoning_tokens,
        )
        return estimated, model, True

    def _note_anomalies(self, anomalies: tuple[str, ...]) -> None:
        """What was wrong with the upstream's figures: flagged on the record, and logged."""
        if anomalies:
            self._flags.add("implausible_usage")
            log.warning("usage.anomalies", request_id=self.request_id, anomalies=list(anomalies)[:8])

    def _elapsed_ms(self) -> int:
        return int((time.monotonic() - self._t0) * 1000)
