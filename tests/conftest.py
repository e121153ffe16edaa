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
