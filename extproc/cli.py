"""The `spendgate` command line."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import psycopg

from extproc import admin, db, log
from extproc.admin import AdminError
from extproc.crypto import Keyring, MasterKeyError, generate_master_key, load_keyring
from extproc.reports import GROUPS

if TYPE_CHECKING:
    from extproc.policy.loader import PolicySet

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# Longer than any key should live or any report should reach back, and far inside what datetime
# and Postgres intervals can add to today without overflowing.
_MAX_DURATION = dt.timedelta(days=100 * 365)


def _duration(text: str) -> dt.timedelta:
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a duration like 30s, 15m, 12h, 7d or 2w, got {text!r}")
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if seconds > _MAX_DURATION.total_seconds():
        raise argparse.ArgumentTypeError(f"{text!r} is more than 100 years; give a shorter duration")
    return _Duration(text, seconds)


class _Duration(dt.timedelta):
    """A duration that remembers how the user wrote it, to be quoted back in messages."""

    text: str

    def __new__(cls, text: str, seconds: int) -> _Duration:
        self = super().__new__(cls, seconds=seconds)
        self.text = text
        return self


def _duration_text(value: dt.timedelta) -> str:
    """A duration as the user wrote it (or in seconds, for a default that was never typed)."""
    return value.text if isinstance(value, _Duration) else f"{int(value.total_seconds())}s"


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected host:port (e.g. 127.0.0.1:9464), got {text!r}")
    return host or "127.0.0.1", int(port)


def _home() -> Path:
    return Path(os.environ.get("SPENDGATE_HOME") or Path.home() / ".spendgate")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {text!r}")
    return port


def _default_policies() -> Path | None:
    """$SPENDGATE_POLICIES, else ./policies if there is one; None: no policy directory.

    SPENDGATE_POLICIES set but empty means none on purpose: `up` starts its workers so when it
    has no directory, lest a restarted worker pick up a ./policies created in the meantime.
    """
    env = os.environ.get("SPENDGATE_POLICIES")
    if env is not None:
        return Path(env) if env else None
    return Path("policies") if Path("policies").is_dir() else None


def _connect() -> psycopg.Connection[Any]:
    """A connection to the database of DATABASE_URL or `spendgate up`; AdminError when there is none."""
    from extproc.server import bounded_dsn, without_password

    url = db.database_url(_home())
    try:
        return psycopg.connect(bounded_dsn(url), autocommit=True)
    except psycopg.Error as exc:
        cause = without_password(_first_line(exc), url)
        raise AdminError(
            f"cannot connect to the database ({cause}); check DATABASE_URL (or SPENDGATE_HOME/database_url) "
            "and that Postgres, or `spendgate up`, is running"
        ) from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


def _print_rows(rows: list[dict[str, Any]], as_json: bool, empty: str) -> None:
    """Rows as JSON, or as a table; `empty` says what there is none of."""
    from extproc.reports import format_table

    if as_json:
        print(json.dumps(rows, default=str, indent=2))
    else:
        print(format_table(rows, empty))


def _warn(message: str) -> None:
    print(f"spendgate: warning: {log.redact(message)}", file=sys.stderr)


def _keyring() -> Keyring:
    """The master keyring, or an AdminError naming where the bad key came from and what to do."""
    try:
        return load_keyring(_home())
    except MasterKeyError as exc:
        if str(exc).startswith("no master key"):
            raise AdminError(
                f"{exc}; `spendgate up` creates the file on its first start, so use the same SPENDGATE_HOME"
            ) from None
        source = (
            "SPENDGATE_MASTER_KEY"
            if os.environ.get("SPENDGATE_MASTER_KEY")
            else os.environ.get("SPENDGATE_MASTER_KEY_FILE") or str(_home() / "master.key")
        )
        if os.environ.get("SPENDGATE_PREVIOUS_MASTER_KEYS"):
            source += " or SPENDGATE_PREVIOUS_MASTER_KEYS"
        raise AdminError(
            f"bad master key in {source}: {exc}; a master key is 32 bytes in url-safe base64, "
            "as `spendgate master-key generate` prints"
        ) from None


def _load_policies(directory: Path) -> PolicySet:
    """The policy set `serve` would load from `directory`; AdminError when it does not load."""
    from extproc.policy.loader import PolicyError, load_policy_dir

    try:
        return load_policy_dir(directory)
    except (PolicyError, OSError) as exc:
        problems = exc.problems if isinstance(exc, PolicyError) else [str(exc)]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AdminError(
            f"the policy directory {directory} does not load: {problems[0]}{more}; pass --policies DIR "
            "(the directory `spendgate up` uses) or set SPENDGATE_POLICIES, and see `spendgate policy check DIR`"
        ) from None


def _policy_names(policies: PolicySet) -> list[str]:
    return sorted(p.name for p in policies.policies)


def _check_policy_name(name: str, directory: Path | None) -> None:
    """Refuse a policy name the policy set does not define: the key would run without its rules."""
    if directory is None:
        raise AdminError(
            f"no policy directory to find policy {name!r} in; pass --policies DIR (the one `spendgate up` "
            "uses) or set SPENDGATE_POLICIES, or --allow-unknown-policy to store it anyway"
        )
    names = _policy_names(_load_policies(directory))
    if name not in names:
        where = f"in {directory}" if directory is not None else "(no policy directory given)"
        known = f"policies there: {', '.join(names)}" if names else "no policies defined"
        raise AdminError(
            f"no policy named {name!r} {where} ({known}); fix the name, pass --policies DIR "
            "(the directory `spendgate up` uses), or --allow-unknown-policy to store it anyway"
        )


def _warn_unknown_policies(rows: list[dict[str, Any]], directory: Path | None) -> None:
    """Name the listed keys whose policy the policy set does not define."""
    from extproc.policy.loader import PolicyError, load_policy_dir

    if directory is None:
        return  # which policies the proxies run is unknown here: no warning beats a false one
    try:
        names = set(_policy_names(load_policy_dir(directory)))
    except (PolicyError, OSError):
        return  # nothing to compare with; `keys create` is where a missing directory is an error
    for r in rows:
        if r.get("policy") and r["policy"] not in names and r.get("revoked_at") is None:
            _warn(
                f"key {r['prefix']} ({r['name']}) names policy {r['policy']!r}, which the policy directory "
                f"{directory} does not define: it runs without that policy's rules"
            )


# -- commands ---------------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    """Run the local stack in the foreground; exit 1, with what to do, when it cannot start."""
    from extproc.stack import Interrupted, Stack, StackError, StackOptions

    try:
        if args.tls_port and not (args.tls_cert and args.tls_key):
            raise AdminError("--tls-port needs --tls-cert and --tls-key")
        if args.fail_open:
            from extproc import failopen

            failopen.failopen_config(args.home, args.fail_open)  # each needs a break-glass key: fail now
        log.configure(os.environ.get("SPENDGATE_LOG_LEVEL", "INFO"))
        stack = Stack(
            StackOptions(
                home=args.home,
                policies=args.policies.resolve() if args.policies else None,
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
    except Interrupted as exc:
        print(f"spendgate: {exc}; nothing is left running", file=sys.stderr)
        return 128 + exc.signum
    except StackError as exc:
        # May span lines: a policy directory's problems, one `file:line: reason` each.
        print(f"spendgate: {log.redact(str(exc))}", file=sys.stderr)
        return 1
    except Exception as exc:
        message = _user_error(exc)
        if message is None:
            raise
        print(f"spendgate: {log.redact(message)}", file=sys.stderr)
        return 1  # documented for `up`; other commands exit 2
    print(stack.banner(), flush=True)
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
            metrics=args.metrics_listen,
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
            raise AdminError(
                f"environment variable {env_name} is empty or unset; export it, or leave out --secret-env "
                "and pipe the secret on stdin"
            )
        return value
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("provider API key: ")
    return sys.stdin.readline()


def cmd_providers(args: argparse.Namespace) -> int:
    """providers add|list|revoke."""
    # The master key and the secret come first: neither needs the database, and a refusal
    # should not wait on a connection.
    keyring = _keyring() if args.action == "add" else None
    secret = _read_secret(args.secret_env) if args.action == "add" else ""
    with _connect() as conn:
        if keyring is not None:
            cid = admin.add_provider(
                conn, keyring, args.provider, args.name, secret, args.base_url, args.fallback
            )
            print(f"added provider credential {args.name} ({args.provider}) id {cid}")
            foreign = admin.foreign_master_keys(conn, keyring)
            if foreign:
                _warn(
                    f"other live credentials here are sealed under master key(s) {', '.join(foreign)}, not "
                    f"{keyring.active_id}; proxies holding that key cannot read this secret. Use the master key "
                    "of `spendgate up` (SPENDGATE_MASTER_KEY or SPENDGATE_HOME/master.key)"
                )
        elif args.action == "list":
            _print_rows(
                admin.list_providers(conn),
                args.json,
                "no provider credentials; add one with `spendgate providers add`",
            )
        else:
            admin.revoke_provider(conn, args.name)
            print(f"revoked provider credential {args.name}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """keys create|list|revoke|rotate."""
    if args.action == "create" and args.policy is not None:
        if args.allow_unknown_policy:
            names = []
            with contextlib.suppress(AdminError):
                names = _policy_names(_load_policies(args.policies)) if args.policies is not None else []
            if args.policy not in names:
                where = f"the policy directory {args.policies}" if args.policies else "any policy directory"
                _warn(
                    f"policy {args.policy!r} is not defined in {where}: until it is, the key runs without it "
                    "(stored because of --allow-unknown-policy)"
                )
        else:
            _check_policy_name(args.policy, args.policies)
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
            rows = admin.list_keys(conn, args.all)
            empty = "no keys" if args.all else "no live keys (--all includes revoked ones)"
            _print_rows(rows, args.json, f"{empty}; issue one with `spendgate keys create`")
            _warn_unknown_policies(rows, args.policies)
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
    keyring = _keyring()
    with _connect() as conn:
        n = admin.rotate_master_key(conn, keyring)
    print(f"re-encrypted {n} credential(s) under master key {keyring.active_id}")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    """Spend report."""
    from extproc.reports import unaccounted_note, unaccounted_requests, usage_report

    since = dt.datetime.now(dt.UTC) - args.since
    with _connect() as conn:
        rows = usage_report(conn, args.by, since)
        note = unaccounted_note(unaccounted_requests(conn, since)) if not args.json else None
    _print_rows(rows, args.json, f"no usage in the last {_duration_text(args.since)}")
    if note:
        print(f"\n{note}")
    return 0


def cmd_budgets(args: argparse.Namespace) -> int:
    """Budget counters of the periods in progress."""
    from extproc.reports import budget_report

    with _connect() as conn:
        rows = budget_report(conn)
    _print_rows(
        rows,
        args.json,
        "no budget counters yet: a counter appears with the first request under a policy with a budget",
    )
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
        if args.base_url is not None:
            from extproc.upstreams import upstream_for

            try:
                upstream_for(args.base_url)
            except ValueError as exc:
                raise AdminError(f"--base-url: {exc}, e.g. https://api.openai.com") from None
        path = failopen.set_breakglass(home, args.provider, _read_secret(args.secret_env), args.base_url)
        print(f"stored the break-glass key for {args.provider} in {path} (mode 0600)")
    elif args.action == "list":
        _print_rows(
            failopen.list_breakglass(home),
            args.json,
            "no break-glass keys; store one with `spendgate breakglass set`",
        )
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
    if args.log is not None and not any(args.log.parent.glob(args.log.name + "*")):
        # Only a named log that is missing is a mistake; the default one exists only after fail-open.
        raise AdminError(f"no file {args.log} (nor rotated copies of it); pass the log Envoy writes (--log)")
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
        raise AdminError(
            f"environment variable {args.key_env} is empty or unset; export a wrapped key (sg-...) in it"
        )
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
        listen=args.metrics_listen,
        stop=stop,
    )


def cmd_policy(args: argparse.Namespace) -> int:
    """policy check DIR."""
    from extproc.policy_check import check_dir

    if not args.dir.is_dir():
        # A wrong argument, not a problem found in a policy repository: status 2, not 1.
        raise AdminError(
            f"{args.dir} is not a directory; pass the policy directory (policy files, pricing.yaml)"
        )
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


_POLICIES_HELP = "the policy directory (default: $SPENDGATE_POLICIES, else ./policies if there is one)"
_JSON_HELP = "print JSON instead of a table"
_PROVIDER_KINDS = ["openai", "anthropic", "gemini"]
_GETTING_STARTED = """\
getting started (README.md, Quick start):
  spendgate up                       # the local stack, in the foreground; then, in another shell:
  spendgate providers add --provider openai --name openai --secret-env OPENAI_API_KEY
  spendgate keys create --name checkout-service --provider openai --team payments
  spendgate usage --by model
An SDK then uses the printed sg-... key as its API key and base URL http://127.0.0.1:8080/v1
(OpenAI; Anthropic and Gemini: http://127.0.0.1:8080). Every flag: docs/configuration.md."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the fix, not the whole usage block."""

    def error(self, message: str) -> NoReturn:
        """Print `message` and where to read more on one line; exit 2."""
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def _command(sub: argparse._SubParsersAction[Any], name: str, text: str) -> argparse.ArgumentParser:
    """A subcommand whose one-line help also heads its own --help."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=text, description=text[:1].upper() + text[1:] + "."
    )
    return parser


def _actions(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[Any]:
    return parser.add_subparsers(dest="action", required=True, metavar="ACTION", title="actions")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a whole number above 0, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = _Parser(
        prog="spendgate",
        description="LLM cost proxy on Envoy ext_proc.",
        epilog=_GETTING_STARTED,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    up = sub.add_parser(
        "up", help="run the local stack (Postgres if needed, extproc, Envoy) in the foreground"
    )
    up.add_argument("--home", type=Path, default=_home(), help="state directory (default ~/.spendgate)")
    up.add_argument(
        "--policies",
        type=Path,
        default=_default_policies(),
        help="policy directory (default: $SPENDGATE_POLICIES, else ./policies if present, else none);"
        " its pricing.yaml, if any, replaces the shipped price table",
    )
    up.add_argument("--host", default="127.0.0.1", help="listen address of the proxy")
    # String defaults go through `type` like typed values: a bad SPENDGATE_PORT is a usage error.
    up.add_argument(
        "--port",
        type=_port,
        default=os.environ.get("SPENDGATE_PORT", "8080"),
        help="proxy port (default: $SPENDGATE_PORT, else 8080)",
    )
    up.add_argument(
        "--admin-port",
        type=_port,
        default=os.environ.get("SPENDGATE_ADMIN_PORT") or None,
        help="Envoy admin port (default: $SPENDGATE_ADMIN_PORT, else 9901 or the next free port)",
    )
    # Envoy needs a core of its own; on the 2-core machines measured, one worker beat two.
    up.add_argument(
        "--workers",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="extproc processes (default: cores/2)",
    )
    up.add_argument("--envoy-concurrency", type=int, default=1, help="Envoy worker threads (default 1)")
    up.add_argument(
        "--metrics-port",
        type=_port,
        default=os.environ.get("SPENDGATE_METRICS_PORT") or None,
        help="Prometheus endpoint of worker i on this port + i; 0: none"
        " (default: $SPENDGATE_METRICS_PORT, else 9464 or the next free ports)",
    )
    up.add_argument(
        "--tls-port", type=_port, help="also serve TLS (HTTP/2 and 1.1) on this port; needs the next two"
    )
    up.add_argument("--tls-cert", help="PEM certificate chain of the TLS listener")
    up.add_argument("--tls-key", help="PEM private key of the TLS listener")
    up.add_argument(
        "--fail-open",
        action="append",
        choices=["openai", "anthropic", "gemini"],
        help="serve this provider with its break-glass key while extproc is unreachable (repeatable)",
    )
    up.add_argument("--ready-timeout", type=float, default=_ready_timeout(), help=_READY_HELP)
    up.set_defaults(func=cmd_up)

    serve = _command(sub, "serve", "run one extproc gRPC process (what `up` runs for each worker)")
    serve.add_argument(
        "--listen",
        default="127.0.0.1:50051",
        help="gRPC address: unix:/path.sock or host:port (default %(default)s)",
    )
    serve.add_argument("--policies", type=Path, default=_default_policies(), help=_POLICIES_HELP)
    serve.add_argument(
        "--spool",
        type=Path,
        help="file for usage records Postgres cannot take yet (default: $SPENDGATE_HOME/spool.jsonl)",
    )
    serve.add_argument(
        "--key-refresh",
        type=_positive_float,
        default=float(os.environ.get("SPENDGATE_KEY_REFRESH", "2")),
        help="longest seconds between two reloads of the key table (default: $SPENDGATE_KEY_REFRESH, else 2)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=8 * 1024 * 1024,
        help="larger request bodies get a 413 (default %(default)s, 8 MiB)",
    )
    serve.add_argument(
        "--metrics-listen", type=_host_port, help="host:port of a Prometheus endpoint (default: none)"
    )
    serve.add_argument("--ready-timeout", type=_positive_float, default=_ready_timeout(), help=_READY_HELP)
    serve.add_argument("--ready-file", type=Path, help="a file holding the pid while the process is SERVING")
    serve.add_argument(
        "--termination-log", type=Path, help="where to write why start-up failed (e.g. /dev/termination-log)"
    )
    serve.set_defaults(func=cmd_serve)

    _command(sub, "migrate", "apply database migrations (`up` does it at start)").set_defaults(
        func=cmd_migrate
    )

    prov = _command(sub, "providers", "provider credentials: the real API keys, stored encrypted")
    psub = _actions(prov)
    add = _command(psub, "add", "store a provider key (read from stdin or --secret-env, never argv)")
    add.add_argument(
        "--provider",
        required=True,
        choices=_PROVIDER_KINDS,
        help="wire protocol (openai: any compatible API)",
    )
    add.add_argument("--name", required=True, help="unique name; `keys create --provider` refers to it")
    add.add_argument(
        "--base-url",
        help="where requests go, e.g. http://127.0.0.1:8000/v1 for vLLM (default: the provider's public API)",
    )
    add.add_argument(
        "--secret-env", help="name of an environment variable holding the key (default: read it from stdin)"
    )
    add.add_argument(
        "--fallback",
        help="a credential of the same provider protocol that Envoy fails over to (5xx, 429, down)",
    )
    plist = _command(psub, "list", "list provider credentials (never their secrets)")
    plist.add_argument("--json", action="store_true", help=_JSON_HELP)
    prev = _command(psub, "revoke", "revoke a credential; every wrapped key on it stops working")
    prev.add_argument("name", help="the credential's name (see `spendgate providers list`)")
    prov.set_defaults(func=cmd_providers)

    keys = _command(sub, "keys", "wrapped keys (sg-...): what applications use instead of provider keys")
    ksub = _actions(keys)
    kc = _command(ksub, "create", "issue a wrapped key (printed once)")
    kc.add_argument("--name", required=True, help="what the key is for, e.g. the application's name")
    kc.add_argument(
        "--provider",
        required=True,
        help="name of the provider credential it unlocks (`spendgate providers list`)",
    )
    kc.add_argument("--team", help="team copied into every usage record of the key")
    kc.add_argument("--project", help="project copied into every usage record of the key")
    kc.add_argument("--policy", help="name of a policy in the policy directory that binds this key")
    kc.add_argument(
        "--policies",
        type=Path,
        default=_default_policies(),
        help=f"{_POLICIES_HELP}, where --policy is checked",
    )
    kc.add_argument(
        "--allow-unknown-policy",
        action="store_true",
        help="store a --policy the policy directory does not define yet (warns; the key runs without it)",
    )
    kc.add_argument(
        "--expires-in", type=_duration, help="the key stops working after this duration, e.g. 90d"
    )
    kc.add_argument("--json", action="store_true", help='print {"id", "prefix", "key"} as JSON')
    kl = _command(ksub, "list", "list wrapped keys (visible prefix only)")
    kl.add_argument("--all", action="store_true", help="include revoked keys")
    kl.add_argument(
        "--policies",
        type=Path,
        default=_default_policies(),
        help=f"{_POLICIES_HELP}; keys naming a policy it lacks are warned about",
    )
    kl.add_argument("--json", action="store_true", help=_JSON_HELP)
    kr = _command(ksub, "revoke", "revoke a key; running proxies refuse it within seconds")
    kr.add_argument("key", help="key id or the visible prefix (sg-xxxxxxxx)")
    kro = _command(ksub, "rotate", "issue a replacement; the old key stops now or after --grace")
    kro.add_argument("key", help="key id or the visible prefix (sg-xxxxxxxx) of the key to replace")
    kro.add_argument(
        "--grace", type=_duration, help="the old key keeps working this long, e.g. 1h (default: 0)"
    )
    kro.add_argument("--json", action="store_true", help='print {"id", "prefix", "key"} as JSON')
    keys.set_defaults(func=cmd_keys)

    mk = _command(sub, "master-key", "the key that encrypts provider secrets")
    mksub = _actions(mk)
    _command(mksub, "generate", "print a new master key (stores nothing)")
    _command(mksub, "rotate", "re-encrypt every credential under the active master key")
    mk.set_defaults(func=cmd_master_key)

    us = _command(sub, "usage", "spend and tokens from the usage records, most expensive first")
    us.add_argument(
        "--by", choices=list(GROUPS), default="key", help="group rows by this (default %(default)s)"
    )
    us.add_argument(
        "--since",
        type=_duration,
        default=_duration("30d"),
        help="how far back, e.g. 12h, 7d (default 30d)",
    )
    us.add_argument("--json", action="store_true", help=_JSON_HELP)
    us.set_defaults(func=cmd_usage)

    bud = _command(sub, "budgets", "budget counters of the periods in progress")
    bud.add_argument("--json", action="store_true", help=_JSON_HELP)
    bud.set_defaults(func=cmd_budgets)

    env = _command(sub, "envoy", "Envoy configuration")
    esub = _actions(env)
    er = _command(esub, "render", "write every shipped Envoy file (envoy.yaml, snippets) under --out")
    er.add_argument("--out", type=Path, default=Path("envoy"), help="output directory (default %(default)s)")
    _command(esub, "clusters", "print Envoy clusters for the providers and stored base URLs, as YAML")
    env.set_defaults(func=cmd_envoy)

    bg = _command(sub, "breakglass", "provider keys Envoy uses itself in fail-open mode")
    bgsub = _actions(bg)
    bgs = _command(bgsub, "set", "store a break-glass key (read from stdin or --secret-env, never argv)")
    bgs.add_argument("--provider", required=True, choices=_PROVIDER_KINDS, help="the provider it is for")
    bgs.add_argument(
        "--secret-env", help="name of an environment variable holding the key (default: read it from stdin)"
    )
    bgs.add_argument("--base-url", help="where the key is valid (default: the provider's public API)")
    bgl = _command(bgsub, "list", "list stored break-glass keys (never the keys themselves)")
    bgl.add_argument("--json", action="store_true", help=_JSON_HELP)
    bgr = _command(bgsub, "remove", "delete a provider's break-glass key")
    bgr.add_argument("--provider", required=True, choices=_PROVIDER_KINDS, help="the provider it is for")
    bg.set_defaults(func=cmd_breakglass)

    fo = _command(sub, "failopen", "requests Envoy served while the filter was down")
    fosub = _actions(fo)
    foi = _command(
        fosub, "import", "turn Envoy's fail-open access log into usage records (`up` does it itself)"
    )
    foi.add_argument(
        "--log", type=Path, help="Envoy's fail-open access log (default: $SPENDGATE_HOME/failopen.log)"
    )
    foi.add_argument(
        "--policies", type=Path, default=_default_policies(), help=f"{_POLICIES_HELP}, for the price table"
    )
    fo.set_defaults(func=cmd_failopen)

    pr = _command(sub, "probe", "a synthetic request through Envoy, the filter and the provider")
    pr.add_argument(
        "--url",
        default=f"http://127.0.0.1:{os.environ.get('SPENDGATE_PORT', '8080')}",
        help="the proxy's URL (default %(default)s)",
    )
    pr.add_argument(
        "--key-env", required=True, help="environment variable holding the wrapped key to probe with"
    )
    pr.add_argument(
        "--provider", choices=_PROVIDER_KINDS, default="openai", help="API to probe (default %(default)s)"
    )
    pr.add_argument("--every", type=_duration, help="probe on this schedule (e.g. 30s) instead of once")
    pr.add_argument(
        "--timeout",
        type=_positive_float,
        default=10.0,
        help="seconds per probe request (default %(default)s)",
    )
    pr.add_argument("--textfile", type=Path, help="write Prometheus text here after each probe")
    pr.add_argument("--metrics-listen", type=_host_port, help="host:port to serve Prometheus /metrics on")
    pr.set_defaults(func=cmd_probe)

    pol = _command(sub, "policy", "policy files")
    polsub = _actions(pol)
    pc = _command(polsub, "check", "validate a policy directory (exit 1 and file:line: reason per problem)")
    pc.add_argument(
        "dir", type=Path, metavar="DIR", help="the policy directory (pricing.yaml and policy files)"
    )
    pol.set_defaults(func=cmd_policy)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("spendgate: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = _user_error(exc)
        if message is None:
            raise  # a bug, not a user error: its traceback is what a bug report needs
        print(f"spendgate: {log.redact(message)}", file=sys.stderr)
        return 2


def _user_error(exc: Exception) -> str | None:
    """The one line that tells the user what went wrong and what to do, or None for a bug."""
    if isinstance(exc, AdminError | MasterKeyError | RuntimeError):
        text = str(exc)
    elif isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn):
        text = (
            f"the database lacks Spendgate's schema or part of it ({_first_line(exc)}); "
            "run `spendgate migrate` against it"
        )
    elif isinstance(exc, psycopg.errors.InsufficientPrivilege):
        text = f"the database refused ({_first_line(exc)}); connect as a user that owns Spendgate's tables"
    elif isinstance(exc, psycopg.OperationalError):
        text = (
            f"lost the database ({_first_line(exc)}); check that Postgres, or `spendgate up`, "
            "is running and try again"
        )
    elif isinstance(exc, psycopg.Error):
        text = f"the database refused the command ({_first_line(exc)}); after an upgrade, run `spendgate migrate`"
    elif isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        text = f"{exc.strerror or exc}{where}; check the path and its permissions"
    else:
        return None
    return " ".join(text.split())  # one line, even when a cause spans several
