"""Where a provider credential's requests go: the Envoy cluster for its base URL."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

K = TypeVar("K", bound=Hashable)

DEFAULT_BASE_URLS = {
    "openai": "https://api.openai.com",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
}
# The shipped Envoy configs define these clusters; any other base URL gets a derived name.
_WELL_KNOWN = {urlsplit(u).hostname: name for name, u in DEFAULT_BASE_URLS.items()}


@dataclass(frozen=True)
class Upstream:
    """An Envoy cluster and what the proxy must know to address it."""

    cluster: str
    host: str
    port: int
    tls: bool
    path_prefix: str  # prepended to the request path, for base URLs such as https://host/openai


def upstream_for(base_url: str) -> Upstream:
    """The upstream for a provider base URL (a trailing /v1 or /v1beta is the API's own path)."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base URL must be http(s)://host[:port][/prefix], got {base_url!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    prefix = re.sub(r"/(v1|v1beta|v1alpha)/?$", "", parts.path.rstrip("/"))
    host = parts.hostname
    if tls and port == 443 and host in _WELL_KNOWN:
        name = _WELL_KNOWN[host]
    else:
        # The readable part folds punctuation (a-b.x and a.b.x look alike), so a digest of the
        # exact address keeps two hosts from ever sharing a cluster, and so a credential.
        exact = hashlib.sha256(f"{parts.scheme}://{host}:{port}".encode()).hexdigest()[:8]
        name = (
            "up_" + re.sub(r"[^a-zA-Z0-9]+", "_", host) + f"_{port}" + ("_tls" if tls else "") + "_" + exact
        )
    return Upstream(name, host, port, tls, prefix)


def failover_cluster(chain: list[str]) -> str:
    """The Envoy aggregate cluster that tries `chain`'s clusters in order."""
    return "fo_" + hashlib.sha256(",".join(chain).encode()).hexdigest()[:12]


MAX_CHAIN = 4  # a primary and up to three fallbacks


def follow_chain(start: K, fallback: dict[K, K], usable: Callable[[K], bool]) -> list[K]:
    """`start`, then its fallbacks while they are usable, without cycles; [] when there are none."""
    chain = [start]
    nxt = fallback.get(start)
    while nxt is not None and len(chain) < MAX_CHAIN and nxt not in chain and usable(nxt):
        chain.append(nxt)
        nxt = fallback.get(nxt)
    return chain if len(chain) > 1 else []
