"""Session fixtures: one real Postgres database, one fake provider, one running stack."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakeprovider import FakeProvider
from tests.support import Issued, Stack, issue_key, scratch_database, start_stack


@pytest.fixture(scope="session")
def database() -> Iterator[str]:
    """A database of its own for this test session."""
    with scratch_database() as dsn:
        yield dsn


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeProvider]:
    """The fake LLM provider (the only fake in the suite)."""
    fp = FakeProvider().start()
    yield fp
    fp.stop()


@pytest.fixture(scope="session")
def stack(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`spendgate up` against the session database."""
    s = start_stack(database, tmp_path_factory.mktemp("stack"))
    yield s
    status = s.stop()
    assert status == 0, s.logs()[-3000:]


@pytest.fixture
def openai_key(stack: Stack, fake: FakeProvider) -> Issued:
    """A fresh wrapped key on an OpenAI credential pointed at the fake."""
    return issue_key(stack, "openai", fake.base_url)


@pytest.fixture
def anthropic_key(stack: Stack, fake: FakeProvider) -> Issued:
    """A fresh wrapped key on an Anthropic credential pointed at the fake."""
    return issue_key(stack, "anthropic", fake.base_url)


@pytest.fixture
def gemini_key(stack: Stack, fake: FakeProvider) -> Issued:
    """A fresh wrapped key on a Gemini credential pointed at the fake."""
    return issue_key(stack, "gemini", fake.base_url)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A scratch directory for a test that starts its own stack."""
    return tmp_path


# -- markers ----------------------------------------------------------------------------------
# Markers come from where a test lives and what it uses, so no test file has to remember them
# (registered in pyproject.toml; see the README's "Tests" section):
#   unit   tests/unit (or a module that says `pytestmark = pytest.mark.unit`): pure Python, no
#          Postgres, no Envoy, no other process. `pytest -m unit` runs in seconds.
#   pg     needs Postgres: the `database` fixture (directly or through `stack`), or a module that
#          uses the Postgres helpers of tests/support.py.
#   envoy  runs Envoy or the fake provider: tests/e2e, the `stack`, `fake` and key fixtures, or a
#          module that starts a stack (`start_stack`) or Envoy itself (`envoy_binary`).
#   slow   the soak test and the tests in SLOW, measured at about 10 s or more on the 2-core
#          development machine. A slow test is never also `unit`. Tests that run past 10 s without
#          being in SLOW are named at the end of the run, so the list can be kept honest.
_TESTS = Path(__file__).resolve().parent
_ENVOY_FIXTURES = frozenset({"stack", "fake", "openai_key", "anthropic_key", "gemini_key"})
_PG_FIXTURES = frozenset({"database"})
_PG_HELPERS = frozenset(
    {"scratch_database", "migrated_database", "system_postgres_available", "SYSTEM_PG", "start_stack"}
)
_ENVOY_HELPERS = frozenset({"start_stack", "envoy_binary"})
_SLOW_SECONDS = 10.0
# Node id prefixes (relative to tests/) of tests measured at about 10 s or more.
SLOW = (
    "unit/test_exchange_hardening.py::test_whatever_usage_an_upstream_reports_the_record_is_written_with_a_cost_that_is_not_negative",
    "e2e/test_supervision.py::test_up_stops_with_a_message_naming_a_worker_that_keeps_dying",
    "e2e/test_stack.py::test_postgres_stopped_and_restarted_under_load_loses_and_duplicates_nothing",
    "e2e/test_first_hour_up.py::test_a_second_up_on_the_same_home_refuses_at_once_and_leaves_the_first_serving",
    "e2e/test_first_hour_up.py::test_a_second_home_starts_without_port_flags_and_prints_the_ports_it_took",
)


def _markers(item: pytest.Item) -> set[str]:
    """The markers a test gets from its location, its fixtures and the helpers its module uses."""
    rel = Path(str(item.path)).resolve().relative_to(_TESTS)
    node = "/".join(rel.parts) + item.nodeid.partition("::")[1] + item.nodeid.partition("::")[2]
    names = set(getattr(item, "fixturenames", ()))
    module = getattr(getattr(item, "module", None), "__dict__", {})
    found = {m.name for m in item.iter_markers() if m.name in ("unit", "pg", "envoy", "slow", "soak")}
    if rel.parts[0] == "unit":
        found.add("unit")
    if rel.parts[0] == "e2e" or names & _ENVOY_FIXTURES or _ENVOY_HELPERS & module.keys():
        found.add("envoy")
    if names & _PG_FIXTURES or _PG_HELPERS & module.keys():
        found.add("pg")
    if "soak" in found or node.startswith(SLOW):
        found.add("slow")
    return found


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Apply unit, pg, envoy and slow; refuse a unit test that needs Postgres or Envoy."""
    wrong = []
    for item in items:
        found = _markers(item)
        if "unit" in found and found & {"pg", "envoy"}:
            wrong.append(f"{item.nodeid} ({', '.join(sorted(found & {'pg', 'envoy'}))})")
        for name in sorted(found - {"soak"}):
            if name == "unit" and "slow" in found:
                continue
            item.add_marker(name)
    if wrong:
        raise pytest.UsageError(
            "tests marked unit that need Postgres or Envoy (move them out of tests/unit):\n  "
            + "\n  ".join(wrong)
        )


_over: list[tuple[str, float]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Note tests whose call took 10 s or more without being marked slow."""
    if report.when == "call" and report.duration >= _SLOW_SECONDS and "slow" not in report.keywords:
        _over.append((report.nodeid, report.duration))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Name the tests that belong in SLOW."""
    if _over:
        terminalreporter.section("tests over 10 s not marked slow (add them to SLOW in tests/conftest.py)")
        for nodeid, seconds in _over:
            terminalreporter.line(f"{seconds:6.1f}s {nodeid}")
