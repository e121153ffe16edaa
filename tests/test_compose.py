"""docker-compose.yml resolves. `docker-compose config` checks it offline; no Docker engine is needed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from extproc.crypto import generate_master_key

ROOT = Path(__file__).resolve().parent.parent


def compose_command() -> list[str] | None:
    """`docker-compose` (v1), else the `docker compose` plugin (v2), else None."""
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    return None


def resolve(compose: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`compose config`: the compose file with its variables filled in, or why it can't be."""
    return subprocess.run(
        [*compose, "-f", "docker-compose.yml", "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compose_file_resolves_and_runs_envoy_1_40() -> None:
    compose = compose_command()
    if compose is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")
    key = generate_master_key()
    env = {**os.environ, "SPENDGATE_MASTER_KEY": key}
    res = resolve(compose, env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    services = yaml.safe_load(res.stdout)["services"]
    assert services["envoy"]["image"].startswith("envoyproxy/envoy:v1.40")
    assert services["extproc"]["environment"]["SPENDGATE_MASTER_KEY"] == key

    # Without a master key the file refuses to resolve, and says how to make one.
    env.pop("SPENDGATE_MASTER_KEY")
    res = resolve(compose, env)
    assert res.returncode != 0
    assert "spendgate master-key generate" in res.stdout + res.stderr
