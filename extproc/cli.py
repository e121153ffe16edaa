"""The `spendgate` command line."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

from extproc import admin, db, log
from extproc.crypto import MasterKeyError, generate_master_key, load_keyring
from extproc.reports import GROUPS

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _duration(text: str) -> dt.timedelta:
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a duration like 30s, 15m, 12h, 7d or 2w, got {text!r}")
    return dt.timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def _home() -> Path:
    return Path(os.environ.get("SPENDGATE_HOME") or Path.home() / ".spendgate")


def _default_policies() -> Path:
    return Path(os.environ.get("SPENDGATE_POLICIES") or "policies")


def _connect() -> psycopg.Connection[Any]:
    return psycopg.connect(db.database_url(_home()), autocommit=True)


def _print_rows(rows: list[dict[str, Any]], as_json: bool) -> None:
    from extproc.reports import format_table

    if as_json:
        print(json.dumps(rows, default=str, indent=2))
    else:
        print(format_table(rows))


# -- commands ---------------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    """Run the local stack in the foreground."""
    from extproc.stack import Stack, StackOptions

    if args.tls_port and not (args.tls_cert and args.tls_key):
        raise admin.AdminError("--tls-port needs --tls-cert and --tls-key")
    if args.fail_open:
        from extproc import failopen

        failopen.failopen_config(args.home, args.fail_open)  # each needs a break-glass key: fail now
    log.configure(os.environ.get("SPENDGATE_LOG_LEVEL", "INFO"))
    stack = Stack(
        StackOptions(
            home=args.home,
            policies=args.policies.resolve(),
            listen_host=args.host,
            port=args.port,
            admin_port=args.admin_port,
            workers=args.workers,
            envoy_concurrency=args.envoy_concurrency,
            tls_port=args.tls_port,
            metrics_port=args.metrics_port,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            fail_open=args.fail_open or [],
            ready_timeout=args.ready_timeout,
        )
    )
    stack.start()
    print(f"Spendgate is up.\n  proxy:  {stack.proxy_url}\n  admin:  {stack.admin_url}", flush=True)
    if args.tls_port:
        print(f"  https:  https://{args.host}:{args.tls_port}", flush=True)
    if args.fail_open:
        print(
            f"  fail-open: {', '.join(args.fail_open)} (served with the break-glass key while extproc is down)"
        )
    print(
        "Point an SDK's base URL at the proxy and use a wrapped key (spendgate keys create). Ctrl-C stops.",
        flush=True,
    )
    return stack.serve_forever()


def cmd_serve(args: argparse.Namespace) -> int:
    """Run one extproc process."""
    from extproc.exchange import Limits
    from extproc.server import ServeOptions, run

    log.configure(os.environ.get("SPENDGATE_LOG_LEVEL", "INFO"))
    home = _home()
    run(
        ServeOptions(
            listen=args.listen,
            dsn=db.database_url(home),
            home=home,
            policies=args.policies,
            spool=args.spool or home / "spool.jsonl",
            key_refresh_seconds=args.key_refresh,
            limits=Limits(max_request_body_bytes=args.max_body_bytes),
            redis_url=os.environ.get("REDIS_URL") or None,
            metrics=_host_port(args.metrics_listen) if args.metrics_listen else None,
            ready_timeout=args.ready_timeout,
            ready_file=args.ready_file,
            termination_log=args.termination_log,
        )
    )
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply pending schema migrations."""
    with _connect() as conn:
        applied = db.migrate(conn)
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    return 0


def _read_secret(env_name: str | None) -> str:
    if env_name:
        value = os.environ.get(env_name)
        if not value:
            raise admin.AdminError(f"environment variable {env_name} is empty or unset")
        return value
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("provider API key: ")
    return sys.stdin.readline()


def cmd_providers(args: argparse.Namespace) -> int:
    """providers add|list|revoke."""
    with _connect() as conn:
        if args.action == "add":
            secret = _read_secret(args.secret_env)
            cid = admin.add_provider(
                conn, load_keyring(_home()), args.provider, args.name, secret, args.base_url, args.fallback
            )
            print(f"added provider credential {args.name} ({args.provider}) id {cid}")
        elif args.action == "list":
            _print_rows(admin.list_providers(conn), args.json)
        else:
            admin.revoke_provider(conn, args.name)
            print(f"revoked provider credential {args.name}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """keys create|list|revoke|rotate."""
    with _connect() as conn:
        if args.action == "create":
            expires = dt.datetime.now(dt.UTC) + args.expires_in if args.expires_in else None
            key = admin.create_key(
                conn,
                args.name,
                args.provider,
                team=args.team,
                project=args.project,
                policy=args.policy,
                expires_at=expires,
            )
            _announce_key(key, args.json)
        elif args.action == "list":
            _print_rows(admin.list_keys(conn, args.all), args.json)
        elif args.action == "revoke":
            kid = admin.revoke_key(conn, args.key)
            print(f"revoked key {kid}; running proxies stop accepting it within seconds")
        else:
            key = admin.rotate_key(conn, args.key, args.grace or dt.timedelta(0))
            _announce_key(key, args.json)
    return 0


def _announce_key(key: admin.NewKey, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"id": str(key.id), "prefix": key.prefix, "key": key.secret}))
    else:
        print(
            f"key id: {key.id}\nprefix: {key.prefix}\n\n{key.secret}\n\nThis key is shown once; store it now."
        )


def cmd_master_key(args: argparse.Namespace) -> int:
    """master-key generate|rotate."""
    if args.action == "generate":
        print(generate_master_key())
        return 0
    keyring = load_keyring(_home())
    with _connect() as conn:
        n = admin.rotate_master_key(conn, keyring)
    print(f"re-encrypted {n} credential(s) under master key {keyring.active_id}")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    """Spend report."""
    from extproc.reports import usage_report

    since = dt.datetime.now(dt.UTC) - args.since
    with _connect() as conn:
        _print_rows(usage_report(conn, args.by, since), args.json)
    return 0


def cmd_budgets(args: argparse.Namespace) -> int:
    """Budget counters of the periods in progress."""
    from extproc.reports import budget_report

    with _connect() as conn:
        _print_rows(budget_report(conn), args.json)
    return 0


def cmd_envoy(args: argparse.Namespace) -> int:
    """envoy render: write the shipped configs; envoy clusters: clusters for the stored providers."""
    from extproc import shipped_configs

    if args.action == "render":
        for name in shipped_configs.write_all(args.out):
            print(f"wrote {name}")
        return 0
    with _connect() as conn:
        urls = [r[0] for r in conn.execute("SELECT DISTINCT base_url FROM provider_credentials")]
    print(shipped_configs.clusters_yaml(urls), end="")
    return 0


def cmd_breakglass(args: argparse.Namespace) -> int:
    """breakglass set|list|remove: the provider keys Envoy holds for fail-open."""
    from extproc import failopen

    home = _home()
    if args.action == "set":
        path = failopen.set_breakglass(home, args.provider, _read_secret(args.secret_env), args.base_url)
        print(f"stored the break-glass key for {args.provider} in {path} (mode 0600)")
    elif args.action == "list":
        _print_rows(failopen.list_breakglass(home), args.json)
    else:
        found = failopen.remove_breakglass(home, args.provider)
        print(
            f"removed the break-glass key for {args.provider}"
            if found
            else f"no break-glass key for {args.provider}"
        )
    return 0


def cmd_failopen(args: argparse.Namespace) -> int:
    """failopen import: usage records for the requests Envoy served while the filter was down."""
    from extproc import failopen

    log.configure(os.environ.get("SPENDGATE_LOG_LEVEL", "WARNING"))  # stdout is for the result
    home = _home()
    log_path = args.log or home / failopen.ACCESS_LOG
    importer = failopen.Importer(
        log_path,
        db.database_url(home),
        prices=failopen.load_prices(args.policies),
        prefixes=failopen.path_prefixes(home),
    )
    try:
        stats = importer.run()
    except failopen.ImportDeferred as exc:
        print(f"spendgate: {exc}; nothing imported, run again later", file=sys.stderr)
        return 1
    print(json.dumps(stats.as_dict()))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    """A synthetic request through Envoy, the filter and the provider."""
    from extproc import probe

    key = os.environ.get(args.key_env, "")
    if not key:
        raise admin.AdminError(f"environment variable {args.key_env} is empty or unset")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return probe.run(
        args.url,
        key,
        provider=args.provider,
        every=args.every.total_seconds() if args.every else None,
        timeout=args.timeout,
        textfile=args.textfile,
        listen=_host_port(args.metrics_listen) if args.metrics_listen else None,
        stop=stop,
    )


def cmd_policy(args: argparse.Namespace) -> int:
    """policy check DIR."""
    from extproc.policy_check import check_dir

    problems = check_dir(args.dir)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    print(f"{args.dir}: ok")
    return 0


# -- parser -----------------------------------------------------------------------------------
_READY_HELP = "seconds an extproc process has to load keys and policies and reach Postgres, or it exits"


def _ready_timeout() -> float:
    return float(os.environ.get("SPENDGATE_READY_TIMEOUT", "30"))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(prog="spendgate", description="LLM cost proxy on Envoy ext_proc.")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser(
        "up", help="run the local stack (Postgres if needed, extproc, Envoy) in the foreground"
    )
    up.add_argument("--home", type=Path, default=_home(), help="state directory (default ~/.spendgate)")
    up.add_argument("--policies", type=Path, default=_default_policies())
    up.add_argument("--host", default="127.0.0.1", help="listen address of the proxy")
    up.add_argument("--port", type=int, default=int(os.environ.get("SPENDGATE_PORT", "8080")))
    up.add_argument("--admin-port", type=int, default=int(os.environ.get("SPENDGATE_ADMIN_PORT", "9901")))
    # Envoy needs a core of its own; on the 2-core machines measured, one worker beat two.
    up.add_argument(
        "--workers",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="extproc processes (default: cores/2)",
    )
    up.add_argument("--envoy-concurrency", type=int, default=1)
    up.add_argument(
        "--metrics-port",
        type=int,
        default=9464,
        help="Prometheus endpoint of worker i on this port + i (0: none)",
    )
    up.add_argument("--tls-port", type=int)
    up.add_argument("--tls-cert")
    up.add_argument("--tls-key")
    up.add_argument(
        "--fail-open",
        action="append",
        choices=["openai", "anthropic", "gemini"],
        help="serve this provider with its break-glass key while extproc is unreachable (repeatable)",
    )
    up.add_argument("--ready-timeout", type=float, default=_ready_timeout(), help=_READY_HELP)
    up.set_defaults(func=cmd_up)

    serve = sub.add_parser("serve", help="run one extproc gRPC process")
    serve.add_argument("--listen", default="127.0.0.1:50051", help="unix:/path.sock or host:port")
    serve.add_argument("--policies", type=Path, default=_default_policies())
    serve.add_argument("--spool", type=Path)
    serve.add_argument(
        "--key-refresh", type=float, default=float(os.environ.get("SPENDGATE_KEY_REFRESH", "2"))
    )
    serve.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    serve.add_argument("--metrics-listen", help="host:port of a Prometheus endpoint (default: none)")
    serve.add_argument("--ready-timeout", type=float, default=_ready_timeout(), help=_READY_HELP)
    serve.add_argument("--ready-file", type=Path, help="a file holding the pid while the process is SERVING")
    serve.add_argument(
        "--termination-log", type=Path, help="where to write why start-up failed (e.g. /dev/termination-log)"
    )
    serve.set_defaults(func=cmd_serve)

    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)

    prov = sub.add_parser("providers", help="provider credentials")
    psub = prov.add_subparsers(dest="action", required=True)
    add = psub.add_parser("add", help="store a provider key (read from stdin or --secret-env, never argv)")
    add.add_argument("--provider", required=True, choices=["openai", "anthropic", "gemini"])
    add.add_argument("--name", required=True)
    add.add_argument("--base-url", help="an OpenAI-compatible or other base URL (default: the provider's)")
    add.add_argument("--secret-env", help="name of an environment variable holding the key")
    add.add_argument(
        "--fallback",
        help="a credential of the same provider protocol that Envoy fails over to (5xx, 429, down)",
    )
    plist = psub.add_parser("list")
    plist.add_argument("--json", action="store_true")
    prev = psub.add_parser("revoke")
    prev.add_argument("name")
    prov.set_defaults(func=cmd_providers)

    keys = sub.add_parser("keys", help="wrapped keys")
    ksub = keys.add_subparsers(dest="action", required=True)
    kc = ksub.add_parser("create", help="issue a wrapped key (printed once)")
    kc.add_argument("--name", required=True)
    kc.add_argument("--provider", required=True, help="name of the provider credential it unlocks")
    kc.add_argument("--team")
    kc.add_argument("--project")
    kc.add_argument("--policy")
    kc.add_argument("--expires-in", type=_duration)
    kc.add_argument("--json", action="store_true")
    kl = ksub.add_parser("list")
    kl.add_argument("--all", action="store_true", help="include revoked keys")
    kl.add_argument("--json", action="store_true")
    kr = ksub.add_parser("revoke")
    kr.add_argument("key", help="key id or the visible prefix (sg-xxxxxxxx)")
    kro = ksub.add_parser("rotate", help="issue a replacement; the old key stops now or after --grace")
    kro.add_argument("key")
    kro.add_argument("--grace", type=_duration)
    kro.add_argument("--json", action="store_true")
    keys.set_defaults(func=cmd_keys)

    mk = sub.add_parser("master-key", help="the key that encrypts provider secrets")
    mk.add_argument("action", choices=["generate", "rotate"])
    mk.set_defaults(func=cmd_master_key)

    us = sub.add_parser("usage", help="spend and tokens")
    us.add_argument("--by", choices=list(GROUPS), default="key")
    us.add_argument("--since", type=_duration, default=dt.timedelta(days=30))
    us.add_argument("--json", action="store_true")
    us.set_defaults(func=cmd_usage)

    bud = sub.add_parser("budgets", help="budget counters of the periods in progress")
    bud.add_argument("--json", action="store_true")
    bud.set_defaults(func=cmd_budgets)

    env = sub.add_parser("envoy", help="Envoy configuration")
    env.add_argument("action", choices=["render", "clusters"])
    env.add_argument("--out", type=Path, default=Path("envoy"))
    env.set_defaults(func=cmd_envoy)

    bg = sub.add_parser("breakglass", help="provider keys Envoy uses itself in fail-open mode")
    bgsub = bg.add_subparsers(dest="action", required=True)
    bgs = bgsub.add_parser(
        "set", help="store a break-glass key (read from stdin or --secret-env, never argv)"
    )
    bgs.add_argument("--provider", required=True, choices=["openai", "anthropic", "gemini"])
    bgs.add_argument("--secret-env", help="name of an environment variable holding the key")
    bgs.add_argument("--base-url", help="where the key is valid (default: the provider's public API)")
    bgl = bgsub.add_parser("list")
    bgl.add_argument("--json", action="store_true")
    bgr = bgsub.add_parser("remove")
    bgr.add_argument("--provider", required=True, choices=["openai", "anthropic", "gemini"])
    bg.set_defaults(func=cmd_breakglass)

    fo = sub.add_parser("failopen", help="requests Envoy served while the filter was down")
    fo.add_argument("action", choices=["import"])
    fo.add_argument(
        "--log", type=Path, help="Envoy's fail-open access log (default: ~/.spendgate/failopen.log)"
    )
    fo.add_argument("--policies", type=Path, default=_default_policies(), help="for the price table")
    fo.set_defaults(func=cmd_failopen)

    pr = sub.add_parser("probe", help="a synthetic request through Envoy, the filter and the provider")
    pr.add_argument("--url", default=f"http://127.0.0.1:{os.environ.get('SPENDGATE_PORT', '8080')}")
    pr.add_argument(
        "--key-env", required=True, help="environment variable holding the wrapped key to probe with"
    )
    pr.add_argument("--provider", choices=["openai", "anthropic", "gemini"], default="openai")
    pr.add_argument("--every", type=_duration, help="probe on this schedule (e.g. 30s) instead of once")
    pr.add_argument("--timeout", type=float, default=10.0)
    pr.add_argument("--textfile", type=Path, help="write Prometheus text here after each probe")
    pr.add_argument("--metrics-listen", help="host:port to serve Prometheus /metrics on")
    pr.set_defaults(func=cmd_probe)

    pol = sub.add_parser("policy", help="policy files")
    pol.add_argument("action", choices=["check"])
    pol.add_argument("dir", type=Path)
    pol.set_defaults(func=cmd_policy)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (admin.AdminError, MasterKeyError, RuntimeError, psycopg.OperationalError) as exc:
        print(f"spendgate: {log.redact(str(exc))}", file=sys.stderr)
        return 2
