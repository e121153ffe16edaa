"""The Envoy files shipped in envoy/, rendered from envoy_config so they cannot drift."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from extproc import envoy_config as ec
from extproc.upstreams import upstream_for

# Debian/Ubuntu's bundle; the official Envoy image has it at this path too.
SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"
_HEADER = "# Rendered by `spendgate envoy render`; edit extproc/envoy_config.py, not this file.\n"


def _dump(doc: Any) -> str:
    return _HEADER + yaml.safe_dump(doc, sort_keys=False)


def documents() -> dict[str, Any]:
    """Every shipped file, by path relative to envoy/."""
    standalone = ec.BootstrapOptions(
        endpoints=[ec.Endpoint("127.0.0.1:50051")], ca_file=SYSTEM_CA, listen_host="0.0.0.0"
    )
    compose = ec.BootstrapOptions(
        endpoints=[ec.Endpoint("extproc:50051")],
        ca_file=SYSTEM_CA,
        listen_host="0.0.0.0",
        admin_host="0.0.0.0",
    )
    return {
        "envoy.yaml": ec.bootstrap(standalone),
        "envoy.compose.yaml": ec.bootstrap(compose),
        "snippets/http_filters.yaml": [ec.ext_proc_filter()],
        "snippets/early_header_mutation_extensions.yaml": ec.strip_route_header(),
        "snippets/hcm_options.yaml": ec.hcm_options(),
        "snippets/local_reply_config.yaml": ec.local_reply_config(),
        "snippets/extproc_cluster.yaml": ec.ext_proc_cluster([ec.Endpoint("127.0.0.1:50051")]),
        "snippets/provider_clusters.yaml": [
            ec.provider_cluster(u, SYSTEM_CA) for u in ec.default_upstreams()
        ],
        "snippets/route_config.yaml": ec.route_config(),
    }


def rendered() -> dict[str, str]:
    """The text of every shipped file."""
    return {name: _dump(doc) for name, doc in documents().items()}


def write_all(out: Path) -> list[str]:
    """Write the shipped files under `out`."""
    names = []
    for name, text in rendered().items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        names.append(str(path))
    return names


def clusters_yaml(base_urls: list[str]) -> str:
    """Provider clusters for stored credentials, for an ingress that is not run by `spendgate up`."""
    ups = {u.cluster: u for u in ec.default_upstreams()}
    for url in base_urls:
        up = upstream_for(url)
        ups.setdefault(up.cluster, up)
    return yaml.safe_dump([ec.provider_cluster(u, SYSTEM_CA) for u in ups.values()], sort_keys=False)
