"""Where the price table comes from: shipped in the package, replaced by a policy directory's own."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from extproc import failopen
from extproc.cli import _default_policies, main
from extproc.policy.loader import PolicyError, load_policy_dir
from extproc.policy.store import PolicyStore
from extproc.pricing import SHIPPED_PRICES, price_table_path

REPO = Path(__file__).resolve().parents[2]
POLICY = "policies:\n  - name: t\n    applies_to: {team: payments}\n"
OWN_PRICES = """\
version: "mine-1"
effective_date: 2026-01-01
models:
  my-model: {provider: openai, input: "1", cached_input: "0.5", output: "2", max_output_tokens: 100}
"""


def test_the_shipped_table_lives_in_the_package_and_is_package_data() -> None:
    assert SHIPPED_PRICES.parent == Path(failopen.__file__).parent
    assert load_policy_dir(None).prices.lookup("fake-openai-model") is not None
    # Without this entry a wheel would ship no price table and `up` would fail outside a checkout.
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert SHIPPED_PRICES.name in data["extproc"]
    assert not (REPO / "policies" / "pricing.yaml").exists(), "one canonical table, in the package"


def test_price_table_path_prefers_the_directory_s_own_table(tmp_path: Path) -> None:
    assert price_table_path(None) == SHIPPED_PRICES
    assert price_table_path(tmp_path) == SHIPPED_PRICES
    (tmp_path / "pricing.yaml").write_text(OWN_PRICES)
    assert price_table_path(tmp_path) == tmp_path / "pricing.yaml"


def test_no_directory_means_shipped_prices_and_no_policies() -> None:
    ps = load_policy_dir(None)
    assert ps.policies == () and ps.prices_path == SHIPPED_PRICES


def test_a_directory_without_pricing_yaml_uses_the_shipped_table(tmp_path: Path) -> None:
    (tmp_path / "team.yaml").write_text(POLICY)
    ps = load_policy_dir(tmp_path)
    assert [p.name for p in ps.policies] == ["t"]
    assert ps.prices_path == SHIPPED_PRICES
    assert ps.prices.version == load_policy_dir(None).prices.version


def test_a_user_pricing_yaml_replaces_the_shipped_table_whole(tmp_path: Path) -> None:
    (tmp_path / "pricing.yaml").write_text(OWN_PRICES)
    ps = load_policy_dir(tmp_path)
    assert ps.prices.version == "mine-1" and ps.prices_path == tmp_path / "pricing.yaml"
    assert ps.prices.lookup("my-model") is not None
    assert ps.prices.lookup("fake-openai-model") is None  # not merged with the shipped list


def test_a_broken_user_table_is_an_error_not_a_silent_fallback(tmp_path: Path) -> None:
    (tmp_path / "pricing.yaml").write_text(OWN_PRICES.replace('output: "2"', 'output: "oops"'))
    with pytest.raises(PolicyError) as exc:
        load_policy_dir(tmp_path)
    assert exc.value.problems[0].startswith(f"{tmp_path / 'pricing.yaml'}:4: ")


def test_a_named_directory_that_is_not_there_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as exc:
        load_policy_dir(tmp_path / "typo")
    assert exc.value.problems == [f"{tmp_path / 'typo'}: no such policy directory"]


def test_policy_check_passes_on_a_directory_without_pricing_yaml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "team.yaml").write_text(POLICY)
    assert main(["policy", "check", str(tmp_path)]) == 0
    # ...and still checks the policies themselves against the shipped table.
    (tmp_path / "bad.yaml").write_text("policies:\n  - name: b\n    applies_to: {all: true}\n    nope: 1\n")
    assert main(["policy", "check", str(tmp_path)]) == 1
    assert "bad.yaml:4" in capsys.readouterr().err


def test_the_store_follows_a_pricing_yaml_added_and_removed(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path)
    assert store.current.prices_path == SHIPPED_PRICES
    own = tmp_path / "pricing.yaml"
    own.write_text(OWN_PRICES)
    assert store.reload_if_changed() and store.current.prices.version == "mine-1"
    own.unlink()
    assert store.reload_if_changed() and store.current.prices_path == SHIPPED_PRICES


def test_a_store_without_a_directory_never_reloads() -> None:
    store = PolicyStore(None)
    assert store.current.prices_path == SHIPPED_PRICES and not store.reload_if_changed()


def test_a_store_keeps_its_set_when_the_directory_disappears(tmp_path: Path) -> None:
    d = tmp_path / "p"
    d.mkdir()
    (d / "team.yaml").write_text(POLICY)
    store = PolicyStore(d)
    (d / "team.yaml").unlink()
    d.rmdir()
    assert not store.reload_if_changed()
    assert [p.name for p in store.current.policies] == ["t"] and store.last_error


def test_fail_open_estimates_use_the_same_table(tmp_path: Path) -> None:
    shipped = failopen.load_prices(None)
    assert shipped is not None and shipped.version == load_policy_dir(None).prices.version
    (tmp_path / "pricing.yaml").write_text(OWN_PRICES)
    own = failopen.load_prices(tmp_path)
    assert own is not None and own.version == "mine-1"


@pytest.mark.parametrize(
    ("env", "make_dir", "expected"),
    [
        (None, False, None),  # outside a checkout: no policies, the shipped prices
        (None, True, Path("policies")),
        ("", True, None),  # set but empty: none on purpose, even with ./policies present
        ("/elsewhere", False, Path("/elsewhere")),  # named: kept, so a typo is reported, not ignored
    ],
)
def test_default_policy_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: str | None, make_dir: bool, expected: Path | None
) -> None:
    monkeypatch.chdir(tmp_path)
    if env is None:
        monkeypatch.delenv("SPENDGATE_POLICIES", raising=False)
    else:
        monkeypatch.setenv("SPENDGATE_POLICIES", env)
    if make_dir:
        os.mkdir("policies")
    assert _default_policies() == expected
