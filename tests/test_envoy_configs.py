"""Every shipped Envoy config is current and passes `envoy --mode validate`."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import certifi
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec as ecdsa
from cryptography.x509.oid import NameOID

from extproc import envoy_config, envoy_messages, shipped_configs
from extproc.exchange import REQUEST_ID_HEADER, Reply
from extproc.providers import PROVIDERS
from extproc.stack import envoy_binary
from extproc.upstreams import upstream_for

ENVOY_DIR = Path(__file__).resolve().parent.parent / "envoy"


def validate(config: Mapping[str, object], tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    res = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]


def self_signed(tmp_path: Path) -> tuple[str, str]:
    """A throwaway certificate and key for localhost."""
    key = ecdsa.generate_private_key(ecdsa.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_path), str(key_path)


@pytest.mark.parametrize("name", sorted(shipped_configs.rendered()))
def test_shipped_file_matches_what_the_code_renders(name: str) -> None:
    assert (ENVOY_DIR / name).read_text() == shipped_configs.rendered()[name], "run `spendgate envoy render`"


@pytest.mark.parametrize("name", ["envoy.yaml", "envoy.compose.yaml"])
def test_shipped_bootstrap_validates(name: str, tmp_path: Path) -> None:
    validate(yaml.safe_load((ENVOY_DIR / name).read_text()), tmp_path)


def test_snippets_drop_into_an_existing_envoy_config_and_validate(tmp_path: Path) -> None:
    """A user's own listener plus our filters, route config and clusters, taken from the snippet files."""

    def snippet(name: str) -> Any:
        return yaml.safe_load((ENVOY_DIR / "snippets" / name).read_text())

    config = {
        "static_resources": {
            "listeners": [
                {
                    "name": "users_ingress",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "ingress",
                                        **snippet("hcm_options.yaml"),
                                        "local_reply_config": snippet("local_reply_config.yaml"),
                                        "early_header_mutation_extensions": snippet(
                                            "early_header_mutation_extensions.yaml"
                                        ),
                                        "route_config": snippet("route_config.yaml"),
                                        "http_filters": [
                                            *snippet("http_filters.yaml"),
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                                },
                                            },
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [snippet("extproc_cluster.yaml"), *snippet("provider_clusters.yaml")],
        }
    }
    validate(config, tmp_path)


def test_bootstrap_with_a_tls_listener_validates(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    opts = envoy_config.BootstrapOptions(
        endpoints=[envoy_config.Endpoint("unix:/tmp/x.sock")],
        ca_file=certifi.where(),
        tls_port=8443,
        tls_cert=cert,
        tls_key=key,
    )
    validate(envoy_config.bootstrap(opts), tmp_path)


def test_filter_fails_closed() -> None:
    cfg = envoy_config.ext_proc_filter()["typed_config"]
    assert cfg["failure_mode_allow"] is False


def test_provider_clusters_verify_upstream_tls_by_default() -> None:
    for cluster in yaml.safe_load((ENVOY_DIR / "snippets" / "provider_clusters.yaml").read_text()):
        tls = cluster["transport_socket"]["typed_config"]
        assert (
            tls["sni"]
            == cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["hostname"]
        )
        assert tls["common_tls_context"]["validation_context"]["trusted_ca"]["filename"]


def test_failover_cluster_and_route_validate(tmp_path: Path) -> None:
    ups = [upstream_for("https://api.openai.com"), upstream_for("https://backup.example.com/v1")]
    opts = envoy_config.BootstrapOptions(
        endpoints=[envoy_config.Endpoint("unix:/tmp/x.sock")], ca_file=certifi.where(), upstreams=ups
    )
    config = envoy_config.bootstrap(opts)
    config["static_resources"]["clusters"].append(envoy_config.failover_cluster([u.cluster for u in ups]))
    validate(config, tmp_path)


def test_fail_open_for_every_provider_validates(tmp_path: Path) -> None:
    from extproc import failopen

    home = tmp_path / "home"
    for provider in ("openai", "anthropic", "gemini"):
        failopen.set_breakglass(home, provider, f"test-{provider}-key", "https://gw.example.com/prefix/v1")
    cert, key = self_signed(tmp_path)
    opts = envoy_config.BootstrapOptions(
        endpoints=[envoy_config.Endpoint("unix:/tmp/x.sock")],
        ca_file=certifi.where(),
        tls_port=8443,
        tls_cert=cert,
        tls_key=key,
        **failopen.bootstrap_options(home, ["openai", "anthropic", "gemini"]),
    )
    config = envoy_config.bootstrap(opts)
    validate(config, tmp_path)
    assert "test-openai-key" not in yaml.safe_dump(config)  # the secret stays in its own file


def test_fail_closed_is_the_default_everywhere() -> None:
    for name, text in shipped_configs.rendered().items():
        assert "failure_mode_allow: true" not in text, name
        assert "spendgate_failopen" not in text, name


def test_local_reply_mappers_leave_the_filters_replies_alone() -> None:
    """The filter's immediate responses are local replies too: every mapper excludes their details,
    and touches nothing below 500."""
    reply = envoy_messages.immediate(Reply(immediate_status=503, body=b"{}"))
    assert reply.immediate_response.details == envoy_config.FILTER_REPLY_DETAILS
    for mapper in envoy_config.local_reply_config()["mappers"]:
        expression = mapper["filter"]["extension_filter"]["typed_config"]["expression"]
        assert expression.startswith(
            f"response.code >= 500 && response.code_details != '{envoy_config.FILTER_REPLY_DETAILS}' && "
        )
        assert "status_code" not in mapper  # the status is kept


def _render(template: object, status: int, message: str) -> object:
    """What Envoy makes of a json_format template (the operators error_format uses)."""
    if isinstance(template, dict):
        return {k: _render(v, status, message) for k, v in template.items()}
    if template == "%RESPONSE_CODE%":
        return status
    if isinstance(template, str) and template.startswith("%CEL("):
        chosen = dict(re.findall(r"response\.code == (\d+) \? '(\w+)'", template))
        return chosen.get(str(status), re.findall(r"'(\w+)'\)%$", template)[0])
    return message if template == "MESSAGE" else template


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
@pytest.mark.parametrize("status", [500, 502, 503, 504, 507])
def test_local_reply_bodies_have_the_providers_error_shape(provider: str, status: int) -> None:
    template = envoy_config.error_format(provider, "MESSAGE")
    expected = json.loads(PROVIDERS[provider].error_body(status, "MESSAGE"))
    assert _render(template, status, "MESSAGE") == expected
    with_code = _render(envoy_config.error_format(provider, "MESSAGE", "spendgate_unavailable"), status, "")
    if provider == "openai":
        assert with_code["error"]["code"] == "spendgate_unavailable"  # type: ignore[index]


def test_a_client_cannot_plant_the_request_id_envoy_copies_onto_its_replies() -> None:
    (ext,) = envoy_config.strip_route_header()
    assert {"remove": REQUEST_ID_HEADER} in ext["typed_config"]["mutations"]
